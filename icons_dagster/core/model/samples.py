"""Records -> encoded samples, decoding images only where they are used.

A record whose image cannot be decoded or that cannot be encoded is skipped with its id
and reason: callers count and list the skips in their metadata, nothing is lost silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from icons_dagster.core.model.encoding import ConversationEncoder, EncodedSample, EncodingError
from icons_dagster.core.data.records import ImageLoadError, Record, load_image


@dataclass
class SkipLog:
    """Skipped records: (id, reason), in the order met."""

    entries: list[tuple[str, str]] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)

    def add(self, record_id: str, reason: str) -> None:
        self.entries.append((record_id, reason))

    def as_metadata(self, limit: int = 50) -> dict:
        return {
            "skipped_count": len(self.entries),
            "skipped": [{"id": i, "reason": r} for i, r in self.entries[:limit]],
            "truncated_count": len(self.truncated),
            "truncated": self.truncated[:limit],
        }


def encode_record(encoder: ConversationEncoder, record: Record) -> EncodedSample:
    image = load_image(record.image_path) if record.image_path is not None else None
    return encoder.encode(record.id, record.turns, image)


def encode_records(encoder: ConversationEncoder, records: Iterable[Record], skips: SkipLog) -> Iterator[EncodedSample]:
    for record in records:
        try:
            sample = encode_record(encoder, record)
        except (ImageLoadError, EncodingError) as error:
            skips.add(record.id, str(error))
            continue
        if sample.truncated:
            skips.truncated.append(record.id)
        yield sample


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def length_grouped_batches(items: Iterable, batch_size: int, window_batches: int, length: Callable[[object], int]) -> Iterator[list]:
    """Batches of similar length, so that little of a batch is padding.

    Each window of ``window_batches`` consecutive batches' worth of items is ordered
    longest first (ties keep input order; the order is a pure function of the lengths)
    and cut into batches. ``window_batches=1`` keeps input order. Memory: one window.
    Callers that need input order put the results back themselves.
    """
    if batch_size < 1 or window_batches < 1:
        raise ValueError(f"batch_size and window_batches must be >= 1, got {batch_size}, {window_batches}")
    for window in batched(items, batch_size * window_batches):
        if window_batches > 1:
            window = sorted(window, key=lambda item: -length(item))
        yield from batched(window, batch_size)


def padded_tokens(lengths: Iterable[int]) -> int:
    """Token positions a right-padded batch of these lengths computes: longest x count."""
    lengths = list(lengths)
    return max(lengths) * len(lengths) if lengths else 0
