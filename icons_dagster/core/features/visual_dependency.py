"""Visual Dependency Score of each record (ICONS Appendix B.3, in its loss form).

``vds = loss_noise - loss_image``: the record's mean per-token answer cross-entropy (the
labels the warm-up trains on, ``ConversationEncoder`` + ``per_sample_loss``) with its image
replaced by Gaussian noise, minus the same loss with its own image; the text is unchanged.
High VDS: the answer needs the image. Text-only records have no image to replace: no score.

The noise is drawn in the processor's normalised pixel space: the encoded sample's
``pixel_values`` are replaced by N(0, 1) draws of the same shape (the other image inputs,
sizes, grids and masks, are kept), so no image is decoded or encoded twice and every
architecture's image-token count stays what the processor made. Each record's draw comes
from a CPU generator seeded by ``sha256(seed, id)``: the same record gets the same noise in
any batch, shard or run, and the scores are byte-identical across runs on one machine
with one thread count (the batches are a pure function of the inputs and lengths).

Both passes of a batch use the same rows and padding, forward only (eval mode, no
autograd), under the placement's autocast as the gradients are, with the vocabulary head
at the answer positions alone where the model takes ``logits_to_keep``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl
import torch

from icons_dagster.core.data.records import Record
from icons_dagster.core.model.encoding import ConversationEncoder, EncodedSample, EncodingError, answer_logit_positions, collate, per_sample_loss
from icons_dagster.core.model.loading import Placement, keeps_logits, scoring_mode
from icons_dagster.core.model.samples import SkipLog, encode_records, length_grouped_batches

NOISE_KEY = "pixel_values"  # the processor output the noise replaces
NOISE_SEED = 0  # the fixed seed every record's noise generator is derived from
SCORED, TEXT_ONLY, SKIPPED = "scored", "text_only", "skipped"


def record_seed(record_id: str, seed: int = NOISE_SEED) -> int:
    """A 63-bit generator seed from the record id: stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}\x00{record_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def noise_pixels(like: torch.Tensor, record_id: str, seed: int = NOISE_SEED) -> torch.Tensor:
    """N(0, 1) draws of ``like``'s shape and dtype, from the record's own CPU generator."""
    generator = torch.Generator(device="cpu").manual_seed(record_seed(record_id, seed))
    return torch.randn(tuple(like.shape), generator=generator, dtype=torch.float32).to(like.dtype)


def with_noise_image(sample: EncodedSample, seed: int = NOISE_SEED) -> EncodedSample:
    """The same sample with its ``pixel_values`` replaced by the record's noise."""
    pixels = sample.image_inputs.get(NOISE_KEY)
    if pixels is None or not pixels.is_floating_point():
        raise EncodingError(f"the processor gave no floating {NOISE_KEY!r} to replace with noise (keys: {sorted(sample.image_inputs)})")
    return replace(sample, image_inputs={**sample.image_inputs, NOISE_KEY: noise_pixels(pixels, sample.id, seed)})


@dataclass
class VisualDependency:
    """Per input record, in input order: its status and, when scored, both losses."""

    ids: list[str]
    status: list[str]  # SCORED, TEXT_ONLY or SKIPPED
    loss_image: np.ndarray  # [n] float32, NaN unless scored
    loss_noise: np.ndarray  # [n] float32, NaN unless scored
    n_answer_tokens: np.ndarray  # [n] int32, 0 unless scored
    skips: SkipLog = field(default_factory=SkipLog)

    @property
    def vds(self) -> np.ndarray:
        """[n] float32: loss_noise - loss_image (NaN unless scored)."""
        return self.loss_noise - self.loss_image

    def frame(self) -> pl.DataFrame:
        """One row per record; the losses and the score are null where the record was not scored."""
        frame = pl.DataFrame(
            {
                "id": self.ids,
                "status": self.status,
                "loss_image": self.loss_image,
                "loss_noise": self.loss_noise,
                "vds": self.vds,
                "n_answer_tokens": self.n_answer_tokens,
            },
            schema_overrides={"id": pl.String, "status": pl.String, "loss_image": pl.Float32, "loss_noise": pl.Float32, "vds": pl.Float32},
        )
        return frame.with_columns(pl.col("loss_image", "loss_noise", "vds").fill_nan(None))

    @classmethod
    def concat(cls, parts: Sequence[VisualDependency]) -> VisualDependency:
        skips = SkipLog()
        for part in parts:
            skips.entries += part.skips.entries
            skips.truncated += part.skips.truncated
        return cls(
            [i for p in parts for i in p.ids],
            [s for p in parts for s in p.status],
            np.concatenate([p.loss_image for p in parts]) if parts else np.zeros(0, np.float32),
            np.concatenate([p.loss_noise for p in parts]) if parts else np.zeros(0, np.float32),
            np.concatenate([p.n_answer_tokens for p in parts]) if parts else np.zeros(0, np.int32),
            skips,
        )


def _losses(model, samples: Sequence[EncodedSample], pad_id: int, placement: Placement, head_at_answers: bool) -> torch.Tensor:
    """[B] mean answer cross-entropy of each sample, fp32 on the CPU."""
    batch = collate(samples, pad_id)
    positions = answer_logit_positions(batch.labels).to(placement.device) if head_at_answers else None
    head = {"logits_to_keep": positions} if positions is not None and positions.numel() else {}
    with placement.forward_context():
        outputs = model(**batch.model_inputs(placement.device, placement.dtype), **head)
        losses = per_sample_loss(outputs.logits, batch.labels, head.get("logits_to_keep"))
    return losses.float().cpu()


def visual_dependency(
    records: Sequence[Record],
    encoder: ConversationEncoder,
    model,
    placement: Placement,
    batch_size: int,
    seed: int = NOISE_SEED,
    length_grouping: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> VisualDependency:
    """Both answer losses and their difference for every record with an image.

    Records are encoded (their images decoded) one window of ``length_grouping`` batches at
    a time; a record that cannot be decoded or encoded, or whose encoding has no
    ``pixel_values``, is skipped with its reason in ``skips``. Text-only records are
    marked, never run.
    """
    n = len(records)
    status = [TEXT_ONLY if r.image_path is None else SKIPPED for r in records]
    loss_image = np.full(n, np.nan, dtype=np.float32)
    loss_noise = np.full(n, np.nan, dtype=np.float32)
    n_answer = np.zeros(n, dtype=np.int32)
    skips = SkipLog()
    pad_id = encoder.tokenizer.pad_token_id
    head_at_answers = keeps_logits(model)
    with_image = [i for i, r in enumerate(records) if r.image_path is not None]

    def pairs() -> Iterator[tuple[int, EncodedSample, EncodedSample]]:
        """(input position, the sample, its noise twin) for every record that encodes."""
        for position in with_image:
            for sample in encode_records(encoder, [records[position]], skips):  # none when skipped
                try:
                    noisy = with_noise_image(sample, seed)
                except EncodingError as error:
                    skips.add(sample.id, str(error))
                    continue
                yield position, sample, noisy

    done = n - len(with_image)  # the text-only records need no pass
    with scoring_mode(model):
        for chunk in length_grouped_batches(pairs(), batch_size, length_grouping, length=lambda item: item[1].input_ids.numel()):
            positions = [p for p, _, _ in chunk]
            own = _losses(model, [s for _, s, _ in chunk], pad_id, placement, head_at_answers)
            noise = _losses(model, [z for _, _, z in chunk], pad_id, placement, head_at_answers)
            loss_image[positions] = own.numpy()
            loss_noise[positions] = noise.numpy()
            for position, sample, _ in chunk:
                status[position] = SCORED
                n_answer[position] = sample.n_answer_tokens
            done += len(positions)
            if progress is not None:
                progress(done + len(skips.entries), n)
    return VisualDependency([r.id for r in records], status, loss_image, loss_noise, n_answer, skips)

