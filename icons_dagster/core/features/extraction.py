"""Gradient features of a set of records at every warm-up checkpoint.

For each checkpoint: load the adapter once onto the base weights, compute batched
per-sample gradients projected by the shared seeded projector, L2-normalize, keep the raw
norms beside them, store float16. One ``FeatureSet`` = the rows for one shard or one
benchmark; rows are in input order minus the skipped records (listed with reasons).

Batches are cut from windows of ``length_grouping`` batches sorted by length, so that
little of each batch is padding (the demo pool in input order at batch 16: 74% more
token positions than tokens; windows of 16 batches: 7%); rows go back to input order.

Out of memory (a GPU batch of long sequences): the batch is halved and retried, and the
smaller size is kept for the rest of the set; a single sample that does not fit is an
error naming it. Nothing is dropped. The backoffs are counted in the metadata (a feature
computed at another batch size may differ in the last bits of float32 round-off).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from icons_dagster.core.model.encoding import ConversationEncoder, collate
from icons_dagster.core.features.gradients import PerSampleGradients, projected_features
from icons_dagster.core.model.training import AdamMoments
from icons_dagster.core.selection.influence import normalize_rows
from icons_dagster.core.model.loading import Placement
from icons_dagster.core.data.records import Record
from icons_dagster.core.model.samples import SkipLog, encode_records, length_grouped_batches, padded_tokens
from icons_dagster.core.storage.artifacts import load_npy, save_npy

SAMPLES_FILE = "samples.parquet"


def features_file(checkpoint_index: int) -> str:
    return f"features-checkpoint-{checkpoint_index}.npy"


@dataclass
class FeatureSet:
    ids: list[str]
    features: list[np.ndarray]  # per checkpoint [n, d'] float16, unit rows
    norms: list[np.ndarray]  # per checkpoint [n] float32, norm before normalization
    losses: list[np.ndarray]  # per checkpoint [n] float32
    n_answer_tokens: np.ndarray  # [n] int32
    n_tokens: np.ndarray  # [n] int32, sequence length after truncation (the model's tokenizer)
    subtasks: list[str | None] = field(default_factory=list)
    skips: SkipLog = field(default_factory=SkipLog)
    oom_backoffs: int = 0  # times a batch was halved after running out of memory
    final_batch_size: int = 0
    padded_tokens: int = 0  # token positions the batches computed (padding included), per checkpoint

    @property
    def padding_share(self) -> float:
        """Share of the computed token positions that were padding."""
        return 1.0 - float(self.n_tokens.sum()) / self.padded_tokens if self.padded_tokens else 0.0

    def save(self, directory: Path) -> None:
        table = {
            "id": self.ids,
            "n_tokens": self.n_tokens,
            "n_answer_tokens": self.n_answer_tokens,
            "subtask": self.subtasks or [None] * len(self.ids),
        }
        for c, (norms, losses) in enumerate(zip(self.norms, self.losses, strict=True)):
            table[f"grad_norm_{c}"] = norms
            table[f"loss_{c}"] = losses
        pl.DataFrame(table, schema_overrides={"subtask": pl.String}).write_parquet(directory / SAMPLES_FILE)
        for c, features in enumerate(self.features):
            save_npy(directory / features_file(c), features)


def load_samples(directory: Path) -> pl.DataFrame:
    return pl.read_parquet(directory / SAMPLES_FILE)


def load_features(directory: Path, checkpoint_index: int, mmap: bool = True) -> np.ndarray:
    return load_npy(directory / features_file(checkpoint_index), mmap=mmap)


def _backed_off_size(batch_size: int, result: FeatureSet) -> int:
    """The batch size after ``result.oom_backoffs`` halvings."""
    return max(1, batch_size >> result.oom_backoffs)


def _with_oom_backoff(chunk: list, batch_size: int, project: Callable, hooks: PerSampleGradients, result: FeatureSet):
    """Yield (part, features, losses) over ``chunk`` in parts of the current batch size.

    On CUDA out-of-memory the part is halved and retried (counted in ``result.oom_backoffs``,
    so every later part keeps the smaller size); no sample is ever
    dropped: one that does not fit alone stops the run with its id.
    """
    start = 0
    while start < len(chunk):
        size = _backed_off_size(batch_size, result)
        part = chunk[start : start + size]
        try:
            projected, loss = project(part)
        except torch.cuda.OutOfMemoryError:
            hooks.release()
            if size == 1:
                raise RuntimeError(
                    f"out of memory on a single sample, {part[0].id} ({part[0].input_ids.numel()} tokens): "
                    "lower max_length, turn on gradient_checkpointing or use a larger device"
                ) from None
            result.oom_backoffs += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        yield part, projected, loss
        start += len(part)


def compute_features(
    records: Sequence[Record],
    encoder: ConversationEncoder,
    checkpoints: Sequence[Callable[[], AbstractContextManager]],
    projector,
    placement: Placement,
    batch_size: int,
    moments: Sequence[AdamMoments | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    length_grouping: int = 1,
) -> FeatureSet:
    """Features of ``records`` at each checkpoint; ``checkpoints[c]()`` opens that checkpoint's peft model.

    Records are encoded (and images decoded) one window of ``length_grouping`` batches at
    a time, so memory stays bounded by the window whatever the shard size; skips are
    logged at the first checkpoint.
    """
    skips = SkipLog()
    subtask_of = {r.id: r.subtask for r in records}
    result = FeatureSet(ids=[], features=[], norms=[], losses=[], n_answer_tokens=np.zeros(0, np.int32), n_tokens=np.zeros(0, np.int32), skips=skips)
    total = len(checkpoints) * len(records)
    pad_id = encoder.tokenizer.pad_token_id
    for c, open_model in enumerate(checkpoints):
        moment = moments[c] if moments is not None else None
        ids, rows, losses, n_tokens, n_answer, positions = [], [], [], [], [], []
        padded = 0
        with open_model() as model, PerSampleGradients(model, placement) as hooks:

            def project(part: list) -> tuple[torch.Tensor, torch.Tensor]:
                return projected_features(hooks, collate(part, pad_id), projector, placement.device, placement.dtype, moment)

            encoded = enumerate(encode_records(encoder, records, skips if c == 0 else SkipLog()))
            for chunk in length_grouped_batches(encoded, batch_size, length_grouping, length=lambda pair: pair[1].input_ids.numel()):
                chunk_positions, samples = zip(*chunk, strict=True)
                done = 0
                for part, projected, loss in _with_oom_backoff(list(samples), batch_size, project, hooks, result):
                    rows.append(projected.cpu())
                    losses.append(loss.float().cpu())
                    positions += chunk_positions[done : done + len(part)]
                    done += len(part)
                    lengths = [s.input_ids.numel() for s in part]
                    ids += [s.id for s in part]
                    n_tokens += lengths
                    n_answer += [s.n_answer_tokens for s in part]
                    padded += padded_tokens(lengths)
                if progress is not None:
                    progress(c * len(records) + len(ids) + len(skips.entries), total)
        order = np.argsort(np.array(positions, dtype=np.int64), kind="stable")  # back to input order
        ids = [ids[i] for i in order]
        n_tokens, n_answer = [n_tokens[i] for i in order], [n_answer[i] for i in order]
        if c == 0:
            result.padded_tokens = padded
            result.ids = ids
            result.n_tokens = np.array(n_tokens, dtype=np.int32)
            result.n_answer_tokens = np.array(n_answer, dtype=np.int32)
            result.subtasks = [subtask_of[i] for i in ids]
        elif ids != result.ids:
            raise RuntimeError(f"checkpoint {c} encoded a different set of records than checkpoint 0")
        index = torch.from_numpy(order)
        stacked = torch.cat(rows)[index] if rows else torch.zeros((0, projector.dim))
        unit, norms = normalize_rows(stacked)
        result.features.append(np.asarray(unit, dtype=np.float32).astype(np.float16))
        result.norms.append(np.asarray(norms, dtype=np.float32))
        result.losses.append(torch.cat(losses)[index].numpy() if losses else np.zeros(0, np.float32))
    result.final_batch_size = _backed_off_size(batch_size, result)
    return result
