"""visual_dependency: each pool record's Visual Dependency Score at the warm-up checkpoint.

The score (``core/features/visual_dependency.py``) is computed with the model ICONS takes
its gradients with: the base weights and the warm-up's last adapter (f_warmup of the
paper's Algorithm 1). The pool is read one shard at a time, so memory holds one shard's
records whatever the pool's size; the table is in pool order, one row per record.

It serves the evaluation's analysis (how much a subset's records need their images), so
the selection never waits for it; ``mean_visual_dependency`` is what a subset report reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from icons_dagster.core import plots
from icons_dagster.core.config import GradientConfig, ModelConfig
from icons_dagster.core.data.pool import (
    record_labels,
    records_from_manifest,
    shard_keys,
)
from icons_dagster.core.features.visual_dependency import (
    NOISE_SEED,
    SCORED,
    TEXT_ONLY,
    VisualDependency,
    visual_dependency,
)
from icons_dagster.core.model.cache import MODELS, ModelCache
from icons_dagster.core.stages.icons import load_pool_manifest
from icons_dagster.core.stages.kit import Log, Progress, Stage, StageResult, quiet_log
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.core.storage.refs import CheckpointRef, PoolRef, VisualDependencyRef

VDS_FILE = "visual_dependency.parquet"
# Bump when the scores' bits change for the same inputs and settings.
VDS_VERSION = 1
GROUP_FIELDS = ("family", "source")  # the record labels the metadata breaks the mean down by


def visual_dependency_settings(gradients: GradientConfig) -> dict:
    """What the scores depend on besides the pool and the checkpoint: the noise, and the batch
    composition (padding changes the last bits of a loss), which follows the gradients'."""
    return {
        "version": VDS_VERSION,
        "noise_seed": NOISE_SEED,
        "adapter": "last warm-up checkpoint",
        "batch_size": gradients.batch_size,
        "length_grouping": gradients.length_grouping,
    }


def stage_visual_dependency(
    store: ArtifactStore,
    pool_ref: PoolRef,
    checkpoint_ref: CheckpointRef,
    model_config: ModelConfig,
    gradients: GradientConfig,
    models: ModelCache = MODELS,
    log: Log = quiet_log,
    progress: Progress | None = None,
    *,
    image_root: Path | None,
) -> StageResult:
    """``image_root``: the configured one, where the pool's images are now."""
    stage = Stage(
        store,
        "visual_dependency",
        pool=pool_ref.fingerprint,
        checkpoint=checkpoint_ref.fingerprint,
        **visual_dependency_settings(gradients),
    )
    if (reused := stage.reused()) is not None:
        return reused
    last = checkpoint_ref.checkpoints[-1]
    adapter = store.absolute(checkpoint_ref.path) / last["dir"] / "adapter"
    encoder, placement = models.encoder(model_config), models.get(model_config)[2]
    parts: list[VisualDependency] = []
    order: list[int] = []  # each row's position in the pool file
    labels: dict[str, list[str | None]] = {name: [] for name in GROUP_FIELDS}
    shards = shard_keys(pool_ref.num_shards)
    log(f"visual dependency of {pool_ref.n_records} records at warm-up checkpoint {last['index']}, {len(shards)} shard(s)")
    with models.with_adapter(model_config, adapter) as model:
        for shard in shards:
            manifest = load_pool_manifest(store, pool_ref, where=pl.col("shard") == shard)
            records = records_from_manifest(manifest, image_root)
            report = None if progress is None else (lambda done, _, offset=len(order): progress(offset + done, pool_ref.n_records))
            parts.append(visual_dependency(records, encoder, model, placement, gradients.batch_size, NOISE_SEED, gradients.length_grouping, report))
            order += [r.index for r in records]
            shard_labels = record_labels(manifest)
            for name in GROUP_FIELDS:
                labels[name] += shard_labels[name]
    result = VisualDependency.concat(parts)
    pool_order = np.argsort(np.asarray(order, dtype=np.int64), kind="stable")
    frame = result.frame()[pool_order]
    labels = {name: [values[i] for i in pool_order] for name, values in labels.items() if any(v is not None for v in values)}
    metadata = vds_metadata(frame, labels)
    with stage.building({"training_pool": pool_ref.fingerprint, "warmup_checkpoint": checkpoint_ref.fingerprint}) as out:
        frame.write_parquet(out.folder / VDS_FILE)
        out.ref = {"n_records": frame.height, "n_scored": metadata["n_scored"], "checkpoint": int(last["index"])}
        out.metadata = {
            **metadata,
            "checkpoint": int(last["index"]),
            "noise_seed": NOISE_SEED,
            "batch_size": gradients.batch_size,
            "n_skipped": len(result.skips.entries),
            **{k: v for k, v in result.skips.as_metadata().items() if k != "skipped_count"},
        }
    log(f"visual dependency: {metadata['n_scored']} scored, {metadata['n_text_only']} text-only, {len(result.skips.entries)} skipped")
    return stage.result()


def vds_metadata(frame: pl.DataFrame, labels: dict[str, list[str | None]]) -> dict[str, Any]:
    """Counts, the score's mean and median, and (where the records carry labels) its mean
    per family / source, as JSON and as a markdown table."""
    scored = frame.filter(pl.col("status") == SCORED)
    vds = scored["vds"].to_numpy().astype(np.float64)
    metadata: dict[str, Any] = {
        "n": frame.height,
        "n_scored": scored.height,
        "n_text_only": int((frame["status"] == TEXT_ONLY).sum()),
        "mean_vds": float(vds.mean()) if len(vds) else None,
        "median_vds": float(np.median(vds)) if len(vds) else None,
        "share_positive_vds": float((vds > 0).mean()) if len(vds) else None,
        "mean_loss_image": float(scored["loss_image"].mean()) if scored.height else None,
        "mean_loss_noise": float(scored["loss_noise"].mean()) if scored.height else None,
    }
    tables = []
    for name, values in labels.items():
        groups = group_means(frame, values)
        metadata[f"mean_vds_by_{name}"] = groups
        tables.append(group_table(name, groups))
    if tables:
        metadata["table"] = "\n\n".join(tables)
    if len(vds):
        png = plots.histogram_png(vds, "visual dependency per record", "loss(noise image) - loss(own image)", 0.0)
        metadata["plots"] = {"vds_histogram": plots.markdown_image(png, "VDS histogram")}
    return metadata


def group_means(frame: pl.DataFrame, values: Sequence[str | None]) -> dict[str, dict[str, Any]]:
    """Per label: records, scored records and their mean VDS (None when none is scored)."""
    grouped = (
        frame.with_columns(pl.Series("group", [v if v is not None else "(none)" for v in values], dtype=pl.String))
        .group_by("group")
        .agg(pl.len().alias("n"), pl.col("vds").count().alias("n_scored"), pl.col("vds").cast(pl.Float64).mean().alias("mean_vds"))
        .sort("group")
    )
    return {row["group"]: {"n": row["n"], "n_scored": row["n_scored"], "mean_vds": row["mean_vds"]} for row in grouped.iter_rows(named=True)}


def group_table(name: str, groups: dict[str, dict[str, Any]]) -> str:
    lines = [f"| {name} | records | scored | mean VDS |", "|---|---|---|---|"]
    for label, row in groups.items():
        mean = "-" if row["mean_vds"] is None else f"{row['mean_vds']:.4f}"
        lines.append(f"| {label} | {row['n']} | {row['n_scored']} | {mean} |")
    return "\n".join(lines)


# -- what the evaluation reads ------------------------------------------------------------


def load_visual_dependency(store: ArtifactStore, ref: VisualDependencyRef) -> pl.DataFrame:
    """The table: id, status, loss_image, loss_noise, vds, n_answer_tokens (nulls unless scored)."""
    return pl.read_parquet(store.absolute(ref.path) / VDS_FILE)


def mean_visual_dependency(store: ArtifactStore, ref: VisualDependencyRef, ids: Sequence[str]) -> float | None:
    """A subset's mean VDS over its records that have one (text-only and skipped records have
    none); None when none has. An id the table lacks is an error: the subset is not of this pool."""
    wanted = pl.DataFrame({"id": list(ids)}, schema={"id": pl.String})
    table = load_visual_dependency(store, ref).select("id", "vds")
    missing = wanted.join(table, on="id", how="anti")["id"].to_list()
    if missing:
        raise ValueError(f"{len(missing)} id(s) are not in visual_dependency ({ref.fingerprint}), e.g. {missing[:3]}: is the subset from another pool?")
    mean = wanted.join(table, on="id", how="inner")["vds"].cast(pl.Float64).mean()
    return None if mean is None else float(mean)
