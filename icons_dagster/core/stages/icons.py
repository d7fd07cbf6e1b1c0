"""The ICONS stages as plain functions over the artifact store (no Dagster here).

Each stage names itself once to the stage kit (``kit.Stage``), which derives its
fingerprint from its settings and its inputs' fingerprints, reuses a complete artifact
with that fingerprint, or builds one atomically. It returns a small reference (what
downstream stages need) and metadata (what a user inspects). Assets are thin wrappers
around these functions.
"""

from __future__ import annotations

import dataclasses
import io
import json
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from icons_dagster.core import plots
from icons_dagster.core.config import DEFAULT_MAX_IMAGE_PIXELS, GradientConfig, LoraSettings, ModelConfig, SelectionConfig, WarmupConfig, image_limit_fields
from icons_dagster.core.data.benchmarks import load_benchmark
from icons_dagster.core.data.image_hashes import ImageHashCache, images_key
from icons_dagster.core.data.pool import MANIFEST_FILE, MANIFEST_VERSION, PROBLEMS_FILE, build_manifest, records_from_manifest
from icons_dagster.core.data.records import gc_paused, load_records, screen_images
from icons_dagster.core.model.samples import SkipLog
from icons_dagster.core.features.extraction import SAMPLES_FILE, FeatureSet, compute_features, features_file, load_features, load_samples
from icons_dagster.core.features.gradients import FEATURES_VERSION
from icons_dagster.core.features.projection import make_projector
from icons_dagster.core.model.cache import MODELS, ModelCache, model_fingerprint_fields
from icons_dagster.core.model.training import checkpoint_weights, load_moments, train_warmup, warmup_indices
from icons_dagster.core.selection import analysis, consensus
from icons_dagster.core.selection.influence import (
    checkpoint_weighted_max,
    full_influence_matrix,
    influence_scores_from_files,
    mean_validation_feature,
    stack_group_means,
)
from icons_dagster.core.stages.kit import Log, Progress, Stage, StageResult, quiet_log
from icons_dagster.core.storage.artifacts import ArtifactStore, StoredArtifact, check_reads, digests_to_fill, save_npy, temporary_sibling, write_json
from icons_dagster.core.storage.refs import CheckpointRef, InfluenceRef, PoolRef, TrainFeaturesRef, ValidationFeaturesRef, VoteTableRef, WarmupSubsetRef

VOTE_TABLE_FILE = "vote_table.parquet"
INFLUENCE_FILE = "influence.parquet"
SUBSET_JSON = "selected_subset.json"
SUBSET_PARQUET = "selected_subset.parquet"



# -- what each stage's fingerprint takes from the configuration (also its code version) ----


def pool_settings(num_shards: int, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """Not the image root: the pool's images enter its fingerprint by content (``images_key``)."""
    return {"num_shards": num_shards, "manifest_version": MANIFEST_VERSION, **image_limit_fields(max_image_pixels)}


def warmup_subset_settings(config: WarmupConfig) -> dict:
    return {"ratio": config.ratio, "seed": config.seed}


def warmup_checkpoint_settings(model_config: ModelConfig, lora: LoraSettings, config: WarmupConfig) -> dict:
    return {"model": model_fingerprint_fields(model_config), "lora": lora, "warmup": config}


# Bump when task_influence computes something else from the same features (2: checkpoints
# summed per subtask before the max over subtasks).
INFLUENCE_VERSION = 2


# Bump when selected_subset writes something else from the same vote (2: a ``reason`` column).
SUBSET_VERSION = 2


def subset_settings(selection: SelectionConfig) -> dict:
    return {"selection": selection, "subset_version": SUBSET_VERSION}


def influence_settings(p: float, write_full_matrix: bool) -> dict:
    return {"p": p, "full_matrix": write_full_matrix, "influence_version": INFLUENCE_VERSION}


# -- training_pool ------------------------------------------------------------------------


def stage_pool(
    store: ArtifactStore, pool_path: Path, image_root: Path | None, num_shards: int, log: Log = quiet_log,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> StageResult:
    """The pool's manifest: its valid records, whose images' headers pass the pixel limit.

    Fingerprinted by the pool file's bytes and its images' (``images_key``), never by where
    they are: a copied or moved pool reuses its artifact, and everything downstream. Every run
    pays this before it finds the artifact (``bench/pool_scale.py``), with the collector paused
    while the parsed pool is alive (``gc_paused``)."""
    with gc_paused():
        return _stage_pool(store, pool_path, image_root, num_shards, log, max_image_pixels)


def _stage_pool(store: ArtifactStore, pool_path: Path, image_root: Path | None, num_shards: int, log: Log, max_image_pixels: int) -> StageResult:
    log(f"reading pool {pool_path}")
    loaded = load_records(pool_path, image_root)
    images = ImageHashCache(store.image_hash_cache).contents(loaded.records, log)
    content = loaded.content_sha256
    images_sha256 = images_key(loaded, images)
    stage = Stage(store, "training_pool", content=content, images=images_sha256, **pool_settings(num_shards, max_image_pixels))
    if (reused := stage.reused()) is not None:
        return _pool_here(reused, pool_path, image_root)
    log(f"checking the headers of the pool's images in {image_root}")
    loaded = screen_images(loaded, max_image_pixels)
    if not loaded.records:
        first = "; ".join(str(p) for p in loaded.problems[:3])
        raise ValueError(f"{pool_path}: no valid record ({len(loaded.problems)} invalid, e.g. {first})")
    manifest_df = build_manifest(loaded.records, num_shards, images)
    with stage.building({"pool_content_sha256": content, "images_sha256": images_sha256}) as out:
        manifest_df.write_parquet(out.folder / MANIFEST_FILE)
        write_json(out.folder / PROBLEMS_FILE, [problem_dict(p) for p in loaded.problems])
        shard_counts = dict(sorted(manifest_df.group_by("shard").len().iter_rows()))
        out.ref = {"n_records": manifest_df.height, "num_shards": num_shards, "source": str(pool_path), "content_sha256": content}
        out.metadata = {
            "source": str(pool_path),
            "image_root": str(image_root),
            "n_records": manifest_df.height,
            "n_text_only": int(manifest_df["image"].is_null().sum()),
            "n_multi_turn": int((manifest_df["n_turns"] > 2).sum()),
            "skipped_count": len(loaded.problems),
            "skipped": [problem_dict(p) for p in loaded.problems[:50]],
            "records_per_shard": shard_counts,
            "content_sha256": content,
            "images_sha256": images_sha256,
        }
    log(f"pool: {manifest_df.height} valid records, {len(loaded.problems)} skipped")
    return stage.result()


def _pool_here(result: StageResult, pool_path: Path, image_root: Path | None) -> StageResult:
    """A reused pool artifact, shown where its pool and images are now (it may have been
    built from a copy elsewhere: its fingerprint says only what they hold)."""
    where = {"source": str(pool_path), "image_root": str(image_root)}
    return dataclasses.replace(result, ref=dataclasses.replace(result.ref, source=str(pool_path)), metadata={**result.metadata, **where})


def problem_dict(problem) -> dict:
    return {"file": problem.file, "index": problem.index, "id": problem.record_id, "reason": problem.reason}


def load_pool_manifest(
    store: ArtifactStore, pool_ref: PoolRef, columns: list[str] | None = None, where: pl.Expr | None = None
) -> pl.DataFrame:
    """The manifest, or only some of its columns / rows (read lazily: it holds every record's JSON)."""
    frame = pl.scan_parquet(store.absolute(pool_ref.path) / MANIFEST_FILE)
    if where is not None:
        frame = frame.filter(where)
    if columns is not None:
        frame = frame.select(columns)
    return frame.collect()


# -- warmup_subset ------------------------------------------------------------------------


def stage_warmup_subset(store: ArtifactStore, pool_ref: PoolRef, config: WarmupConfig) -> StageResult:
    stage = Stage(store, "warmup_subset", pool=pool_ref.fingerprint, **warmup_subset_settings(config))
    if (reused := stage.reused()) is not None:
        return reused
    manifest_df = load_pool_manifest(store, pool_ref, columns=["id"])
    chosen = warmup_indices(manifest_df.height, config.ratio, config.seed)
    ids = manifest_df["id"].gather(chosen)
    with stage.building({"training_pool": pool_ref.fingerprint}) as out:
        pl.DataFrame({"id": ids}).write_parquet(out.folder / "ids.parquet")
        out.ref = {"n_records": len(ids)}
        out.metadata = {"n_records": len(ids), "ratio": config.ratio, "seed": config.seed}
    return stage.result()


# -- warmup_checkpoint --------------------------------------------------------------------


def stage_warmup_checkpoint(
    store: ArtifactStore,
    pool_ref: PoolRef,
    subset_ref: WarmupSubsetRef,
    model_config: ModelConfig,
    lora: LoraSettings,
    config: WarmupConfig,
    models: ModelCache = MODELS,
    log: Log = quiet_log,
    progress: Progress | None = None,
    *,
    image_root: Path | None,
) -> StageResult:
    """``image_root``: the configured one, where the pool's images are now."""
    stage = Stage(
        store,
        "warmup_checkpoint",
        subset=subset_ref.fingerprint,
        **warmup_checkpoint_settings(model_config, lora, config),
    )
    if (reused := stage.reused()) is not None:
        return reused
    subset_ids = pl.read_parquet(store.absolute(subset_ref.path) / "ids.parquet")["id"]
    records = records_from_manifest(load_pool_manifest(store, pool_ref, where=pl.col("id").is_in(subset_ids.implode())), image_root)
    encoder = models.encoder(model_config)
    placement = models.get(model_config)[2]
    skips = SkipLog()
    with stage.building({"warmup_subset": subset_ref.fingerprint, "model": model_fingerprint_fields(model_config)}) as out:
        log(f"warm-up: {len(records)} records, {config.epochs} epoch(s), {config.num_checkpoints} checkpoint(s)")
        with models.with_adapter(model_config, None, lora, config.seed) as peft_model:
            checkpoints = train_warmup(peft_model, encoder, records, config, placement, out.folder, skips, progress)
        weights = checkpoint_weights([c.mean_learning_rate for c in checkpoints])
        entries = [
            {"index": c.index, "step": c.step, "mean_learning_rate": c.mean_learning_rate, "weight": w, "dir": f"checkpoint-{c.index}"}
            for c, w in zip(checkpoints, weights, strict=True)
        ]
        write_json(out.folder / "checkpoints.json", entries)
        out.ref = {"checkpoints": entries, "model": model_fingerprint_fields(model_config)}
        out.metadata = {
            "n_records": len(records),
            "checkpoints": entries,
            "model": model_config.name_or_path,
            "lora_r": lora.r,
            "lora_alpha": lora.alpha,
            **skips.as_metadata(),
        }
    return stage.result()


# -- gradient features ----------------------------------------------------------------------


def _features(
    store: ArtifactStore,
    records,
    checkpoint_ref: CheckpointRef,
    model_config: ModelConfig,
    gradients: GradientConfig,
    gradient_type: str,
    models: ModelCache,
    progress: Progress | None,
) -> FeatureSet:
    """Features at every warm-up checkpoint: its adapter loaded once onto the base weights."""
    ckpt_dir = store.absolute(checkpoint_ref.path)
    folders = [ckpt_dir / entry["dir"] for entry in checkpoint_ref.checkpoints]
    return compute_features(
        records,
        models.encoder(model_config),
        [partial(models.with_adapter, model_config, folder / "adapter") for folder in folders],
        make_projector(gradients.projector, gradients.dim, gradients.seed),
        models.get(model_config)[2],
        gradients.batch_size,
        [load_moments(folder, gradients.adam_eps) if gradient_type == "adam" else None for folder in folders],
        progress,
        length_grouping=gradients.length_grouping,
    )


def _feature_metadata(features: FeatureSet, gradients: GradientConfig, gradient_type: str) -> dict:
    return {
        "n_samples": len(features.ids),
        "projector": gradients.projector,
        "projection_dim": gradients.dim,
        "projection_seed": gradients.seed,
        "gradient_type": gradient_type,
        "mean_grad_norm": [float(np.mean(n)) if len(n) else 0.0 for n in features.norms],
        "mean_loss": [float(np.mean(x)) if len(x) else 0.0 for x in features.losses],
        "batch_size": gradients.batch_size,
        "length_grouping": gradients.length_grouping,
        "padding_share": round(features.padding_share, 4),
        "oom_backoffs": features.oom_backoffs,
        "final_batch_size": features.final_batch_size,
        **features.skips.as_metadata(),
    }


def gradient_fingerprint_fields(gradients: GradientConfig, gradient_type: str) -> dict:
    return {
        "features_version": FEATURES_VERSION,
        "projector": gradients.projector,
        "dim": gradients.dim,
        "seed": gradients.seed,
        "gradient_type": gradient_type,
        "adam_eps": gradients.adam_eps if gradient_type == "adam" else None,
        "batch_size": gradients.batch_size,
        "length_grouping": gradients.length_grouping,
    }


def stage_train_shard(
    store: ArtifactStore,
    shard: str,
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
    gradient_type = gradients.train_gradient
    stage = Stage(
        store,
        "training_gradients",
        shard,
        pool=pool_ref.fingerprint,
        checkpoint=checkpoint_ref.fingerprint,
        gradients=gradient_fingerprint_fields(gradients, gradient_type),
    )
    if (reused := stage.reused()) is not None:
        return reused
    records = records_from_manifest(load_pool_manifest(store, pool_ref, where=pl.col("shard") == shard), image_root)
    log(f"{shard}: gradient features of {len(records)} records")
    features = _features(store, records, checkpoint_ref, model_config, gradients, gradient_type, models, progress)
    with stage.building({"training_pool": pool_ref.fingerprint, "warmup_checkpoint": checkpoint_ref.fingerprint}) as out:
        features.save(out.folder)
        out.ref = {"n_samples": len(features.ids), "shard": shard}
        out.metadata = {"shard": shard, **_feature_metadata(features, gradients, gradient_type)}
    return stage.result()


def stage_validation(
    store: ArtifactStore,
    benchmark: str,
    benchmarks_dir: Path,
    default_image_root: Path | None,
    checkpoint_ref: CheckpointRef,
    model_config: ModelConfig,
    gradients: GradientConfig,
    models: ModelCache = MODELS,
    log: Log = quiet_log,
    progress: Progress | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> StageResult:
    loaded = load_benchmark(benchmarks_dir, benchmark, default_image_root, max_image_pixels=max_image_pixels)
    stage = Stage(
        store,
        "validation_gradients",
        benchmark,
        **image_limit_fields(max_image_pixels),
        benchmark=benchmark,
        content=loaded.content_sha256,
        images=images_key(loaded, ImageHashCache(store.image_hash_cache).contents(loaded.records, log)),
        checkpoint=checkpoint_ref.fingerprint,
        gradients=gradient_fingerprint_fields(gradients, "sgd"),
    )
    if (reused := stage.reused()) is not None:
        return reused
    if not loaded.records:
        raise ValueError(f"benchmark {benchmark!r}: no valid validation records in {loaded.path} ({len(loaded.problems)} skipped)")
    log(f"{benchmark}: gradient features of {len(loaded.records)} validation records")
    features = _features(store, loaded.records, checkpoint_ref, model_config, gradients, "sgd", models, progress)
    if not features.ids:
        raise ValueError(f"benchmark {benchmark!r}: every validation record was skipped: {features.skips.entries[:5]}")
    for skip_id, reason in [(p.record_id or f"#{p.index}", p.reason) for p in loaded.problems]:
        features.skips.add(skip_id, reason)
    with stage.building({"benchmark_content_sha256": loaded.content_sha256, "warmup_checkpoint": checkpoint_ref.fingerprint}) as out:
        features.save(out.folder)
        subtasks = sorted({s for s in features.subtasks if s})
        out.ref = {"n_samples": len(features.ids), "benchmark": benchmark, "content_sha256": loaded.content_sha256}
        out.metadata = {
            "benchmark": benchmark,
            "source": str(loaded.path),
            "content_sha256": loaded.content_sha256,
            "subtasks": subtasks,
            **_feature_metadata(features, gradients, "sgd"),
        }
    return stage.result()


# -- task_influence -----------------------------------------------------------------------


@dataclass(frozen=True)
class _ValidationSet:
    """One benchmark's stored validation features: where they are and their subtask labels."""

    directory: Path
    subtasks: list[str] | None  # None: the benchmark is one group
    n: int

    @classmethod
    def load(cls, store: ArtifactStore, ref: dict) -> _ValidationSet:
        directory = store.absolute(ref.path)
        labels = load_samples(directory)["subtask"].to_list()
        return cls(directory, labels if any(s is not None for s in labels) else None, len(labels))

    def means(self, checkpoint: int) -> np.ndarray:
        return mean_validation_feature(load_features(self.directory, checkpoint, mmap=False), self.subtasks)[0]

    def groups(self) -> list[str]:
        return sorted(set(map(str, self.subtasks))) if self.subtasks is not None else []


def stage_influences(
    store: ArtifactStore,
    pool_ref: PoolRef,
    checkpoint_ref: CheckpointRef,
    train_refs: dict[str, TrainFeaturesRef],
    validation_refs: dict[str, ValidationFeaturesRef],
    p: float,
    write_full_matrix: bool = False,
    log: Log = quiet_log,
) -> dict[str, StageResult]:
    """Eq. 3 per checkpoint, LR-weighted, for every benchmark in ``validation_refs``.

    The benchmarks without a stored artifact are scored together in ONE streaming pass
    over the training features per checkpoint (each benchmark's scores are bit-identical
    to scoring it alone, see ``influence_scores_from_files``), so materializing K
    benchmarks reads the training shards once, not K times. Each benchmark still gets
    its own artifact and fingerprint. The shards are read where they are (streamed from the
    shared store when this machine has no copy) and checked against their manifests from
    the same read. ``write_full_matrix`` also stores the |D| x |V| matrix (it loads each
    shard whole, pulling it from the shared store).
    """
    shards = sorted(train_refs)
    train_fingerprints = [train_refs[s].fingerprint + "/" + s for s in shards]
    results: dict[str, StageResult] = {}
    pending: dict[str, Stage] = {}
    for benchmark in sorted(validation_refs):
        stage = Stage(
            store,
            "task_influence",
            benchmark,
            benchmark=benchmark,
            train=train_fingerprints,
            validation=validation_refs[benchmark].fingerprint,
            checkpoint=checkpoint_ref.fingerprint,
            **influence_settings(p, write_full_matrix),
        )
        if (reused := stage.reused()) is not None:
            results[benchmark] = reused
        else:
            pending[benchmark] = stage
    if not pending:
        return results
    weights = [entry["weight"] for entry in checkpoint_ref.checkpoints]
    # read where they are (streamed from the shared store when this machine has no copy),
    # each file checked against its manifest from the bytes the pass reads
    stored = [store.stored(train_refs[shard].path) for shard in shards]
    ids: list[str] = []
    shard_col: list[str] = []
    for shard, features in zip(shards, stored, strict=True):
        shard_ids = pl.read_parquet(io.BytesIO(features.read_bytes(SAMPLES_FILE)), columns=["id"])["id"].to_list()
        ids += shard_ids
        shard_col += [shard] * len(shard_ids)
    validation = {b: _ValidationSet.load(store, validation_refs[b]) for b in pending}
    # per benchmark and checkpoint: [n, G] scores, one column per subtask group; the
    # checkpoints are summed per group before the max over groups (LESS's order)
    per_ckpt_groups: dict[str, list[np.ndarray]] = {b: [] for b in pending}
    for c in range(len(weights)):
        means = [validation[b].means(c) for b in pending]
        stacked, groups = stack_group_means(means)
        log(f"influence of {len(pending)} benchmark(s) over {len(ids)} training samples, checkpoint {c}: one streaming pass")
        one_per_group = [(g, g + 1) for g in range(stacked.shape[0])]
        files = [(features, features_file(c)) for features in stored]
        digests = digests_to_fill(files)  # the files this process has not yet found intact are hashed as read
        scores = influence_scores_from_files([features.file(name) for features, name in files], stacked, one_per_group, digests=digests)
        check_reads(files, digests)  # scores: [n, G_total], in bounded memory
        for (a, b), benchmark in zip(groups, pending, strict=True):
            per_ckpt_groups[benchmark].append(np.ascontiguousarray(scores[:, a:b]))
    manifest_df = load_pool_manifest(store, pool_ref, columns=["id", "family"])
    families = family_column(manifest_df, ids)
    for benchmark, stage in pending.items():
        results[benchmark] = _write_influence(
            stage, benchmark, pool_ref, train_refs, shards, validation_refs[benchmark], validation[benchmark],
            ids, shard_col, families, per_ckpt_groups[benchmark], weights, p, write_full_matrix, list(pending),
        )
    return {b: results[b] for b in sorted(results)}


def _write_influence(
    stage: Stage,
    benchmark: str,
    pool_ref: PoolRef,
    train_refs: dict[str, TrainFeaturesRef],
    shards: list[str],
    validation_ref: ValidationFeaturesRef,
    validation: _ValidationSet,
    ids: list[str],
    shard_col: list[str],
    families: list[str] | None,
    per_ckpt_groups: list[np.ndarray],
    weights: list[float],
    p: float,
    write_full_matrix: bool,
    scored_together: list[str],
) -> StageResult:
    """One benchmark's influence artifact: the table, its metadata and plots, the optional matrix.

    ``per_ckpt_groups[c]``: checkpoint c's ``[n, G]`` scores per subtask group. The table's
    ``influence_checkpoint_<c>`` is checkpoint c's own max over groups (what it alone says);
    ``influence`` sums the checkpoints per group, then takes the max (``checkpoint_weighted_max``).
    ``scored_together``: the benchmarks of the shared pass (its ``compute_seconds`` include that pass).
    """
    store = stage.store
    scores = checkpoint_weighted_max(per_ckpt_groups, weights)
    table = {"id": ids, "shard": shard_col, "influence": scores.astype(np.float32)}
    for c, values in enumerate(per_ckpt_groups):
        table[f"influence_checkpoint_{c}"] = values.max(axis=1).astype(np.float32)
    frame = pl.DataFrame(table)
    metadata: dict[str, Any] = {
        "benchmark": benchmark,
        "n_train": len(ids),
        "n_validation": validation.n,
        "subtask_groups": validation.groups(),
        "checkpoint_weights": weights,
        "scored_together": scored_together,
        "influence_mean": float(scores.mean()) if len(scores) else 0.0,
        "influence_std": float(scores.std()) if len(scores) else 0.0,
    }
    if len(ids) and families is not None and benchmark in set(families):
        top = analysis.top_fraction_mask(scores, p, ids)
        metadata["specialist_family_enrichment"] = analysis.family_enrichment(top, families, benchmark)
        metadata["specialist_family_shares"] = analysis.family_shares(top, families)
    top_ids = frame.sort(["influence", "id"], descending=[True, False]).head(5)["id"].to_list()
    top_rows = load_pool_manifest(store, pool_ref, columns=["id", "image", "raw_json"], where=pl.col("id").is_in(top_ids))
    metadata["top_samples"] = top_sample_table(top_rows, top_ids, frame)
    plots_md = {}
    if len(ids):
        threshold = float(consensus.vote_thresholds(scores.reshape(-1, 1), p)[0])
        plots_md["influence_histogram"] = plots.markdown_image(
            plots.histogram_png(scores, f"{benchmark}: influence", "mean cosine to validation", threshold), "influence histogram"
        )
    metadata["plots"] = plots_md
    with stage.building({"training_gradients": {s: train_refs[s].fingerprint for s in shards}, "validation_gradients": validation_ref.fingerprint}) as out:
        frame.write_parquet(out.folder / INFLUENCE_FILE)
        if write_full_matrix:
            for c in range(len(weights)):
                val_features = load_features(validation.directory, c, mmap=False)
                matrix = np.concatenate(
                    [full_influence_matrix(load_features(store.absolute(train_refs[s].path), c), val_features) for s in shards]
                )
                save_npy(out.folder / f"influence_matrix-checkpoint-{c}.npy", matrix)
        out.ref = {
            "benchmark": benchmark,
            "n_train": len(ids),
            "benchmark_content_sha256": validation_ref.content_sha256,
            "validation": validation_ref.fingerprint,
        }
        out.metadata = metadata
    return stage.result()


def family_column(manifest_df: pl.DataFrame, ids: list[str]) -> list[str] | None:
    """The demo's ``family`` field of each id, when the pool records carry one."""
    if "family" not in manifest_df.columns or manifest_df["family"].null_count() == manifest_df.height:
        return None
    lookup = dict(zip(manifest_df["id"].to_list(), manifest_df["family"].to_list(), strict=True))
    return [lookup.get(i) or "" for i in ids]


def first_question(raw_json: str) -> str:
    turns = json.loads(raw_json).get("conversations", [])
    text = turns[0]["value"] if turns else ""
    return text.replace("<image>", "").strip().replace("\n", " ")[:80]


def top_sample_table(manifest_df: pl.DataFrame, ids: list[str], frame: pl.DataFrame) -> str:
    """A markdown table of the most influential samples (id, image, first question); ``manifest_df`` holds their rows."""
    by_id = {r["id"]: r for r in manifest_df.iter_rows(named=True)}
    scores = dict(zip(frame["id"].to_list(), frame["influence"].to_list(), strict=True))
    lines = ["| id | influence | image | question |", "|---|---|---|---|"]
    for i in ids:
        row = by_id.get(i, {})
        lines.append(f"| {i} | {scores[i]:.4f} | {row.get('image') or '-'} | {first_question(row['raw_json']) if row else ''} |")
    return "\n".join(lines)


# -- vote_table ---------------------------------------------------------------------------


def stage_vote_table(store: ArtifactStore, influence_refs: dict[str, InfluenceRef], selection: SelectionConfig) -> StageResult:
    benchmarks = sorted(influence_refs)
    if not benchmarks:
        raise ValueError("no benchmark has been registered and scored: register at least one benchmark partition")
    stage = Stage(
        store,
        "vote_table",
        influence=[influence_refs[b].fingerprint + "/" + b for b in benchmarks],
        selection=selection,
    )
    if (reused := stage.reused()) is not None:
        return reused
    frames = [pl.read_parquet(store.absolute(influence_refs[b].path) / INFLUENCE_FILE) for b in benchmarks]
    ids = frames[0]["id"].to_list()
    for b, f in zip(benchmarks, frames, strict=True):
        if f["id"].to_list() != ids:
            raise ValueError(f"task_influence[{b}] covers different training samples than task_influence[{benchmarks[0]}]")
    scores = np.stack([f["influence"].to_numpy().astype(np.float64) for f in frames], axis=1)
    thresholds = consensus.vote_thresholds(scores, selection.p)
    voted = consensus.votes(scores, thresholds)
    weights = selection.weights_for(benchmarks)
    table: dict[str, Any] = {"id": ids, "shard": frames[0]["shard"]}
    for k, b in enumerate(benchmarks):
        table[f"influence__{b}"] = scores[:, k]
        table[f"vote__{b}"] = voted[:, k]
    table["votes"] = voted.sum(axis=1).astype(np.int32)
    if weights is not None:
        table["weighted_votes"] = consensus.aggregate(scores, "vote", p=selection.p, weights=weights)
    for method in (m for m in consensus.AGGREGATIONS if m != "vote"):  # Table 6's other rules
        table[f"agg_{method}"] = consensus.aggregate(scores, method, p=selection.p)
    table["mean_percentile_rank"] = consensus.percentile_ranks(scores).mean(axis=1)
    frame = pl.DataFrame(table)
    masks = {b: voted[:, k] for k, b in enumerate(benchmarks)}
    names, overlap = analysis.overlap_matrix(masks)
    metadata = {
        "benchmarks": benchmarks,
        "thresholds": {b: float(t) for b, t in zip(benchmarks, thresholds, strict=True)},
        "voters_per_benchmark": {b: int(voted[:, k].sum()) for k, b in enumerate(benchmarks)},
        "votes_histogram": {str(v): int((table["votes"] == v).sum()) for v in range(len(benchmarks) + 1)},
        "p": selection.p,
        "plots": {
            "votes_histogram": plots.markdown_image(plots.votes_histogram_png(table["votes"], len(benchmarks)), "votes"),
            "task_overlap": plots.markdown_image(plots.heatmap_png(overlap, names, "overlap of per-task top-p voters"), "overlap"),
        },
    }
    with stage.building({"task_influence": {b: influence_refs[b].fingerprint for b in benchmarks}}) as out:
        frame.write_parquet(out.folder / VOTE_TABLE_FILE)
        write_json(out.folder / "thresholds.json", metadata["thresholds"])
        out.ref = {
            "benchmarks": benchmarks,
            "n_samples": len(ids),
            "influence": {b: influence_refs[b].fingerprint for b in benchmarks},
            "benchmark_content_sha256": {b: influence_refs[b].benchmark_content_sha256 for b in benchmarks},
        }
        out.metadata = metadata
    return stage.result()


# -- selected_subset ----------------------------------------------------------------------


def stage_selected_subset(
    store: ArtifactStore, pool_ref: PoolRef, vote_ref: VoteTableRef, selection: SelectionConfig, lineage: dict | None = None
) -> StageResult:
    stage = Stage(store, "selected_subset", votes=vote_ref.fingerprint, pool=pool_ref.fingerprint, **subset_settings(selection))
    result = stage.reused()
    if result is None:
        result = _build_subset(stage, pool_ref, vote_ref, selection, lineage or {})
    exports = export_subset(store, store.stored(result.ref.path))
    return dataclasses.replace(result, metadata={**result.metadata, "exports": exports})


def _build_subset(stage: Stage, pool_ref: PoolRef, vote_ref: VoteTableRef, selection: SelectionConfig, lineage: dict) -> StageResult:
    store = stage.store
    frame = pl.read_parquet(store.absolute(vote_ref.path) / VOTE_TABLE_FILE)
    benchmarks = vote_ref.benchmarks
    ids = frame["id"].to_list()
    scores = np.stack([frame[f"influence__{b}"].to_numpy() for b in benchmarks], axis=1)
    chosen = consensus.select(
        ids,
        scores,
        selection.p,
        method=selection.method,
        weights=selection.weights_for(benchmarks),
        tiebreak=selection.tiebreak,
        coverage=selection.coverage,
    )
    frame = frame.with_columns(
        pl.Series("rank", chosen.rank), pl.Series("selected", chosen.selected), pl.Series("reason", consensus.selection_reasons(chosen, benchmarks))
    )
    selected_ids = frame.filter(pl.col("selected"))["id"]
    # Original records, untouched, in pool order: LLaVA's training script shuffles itself.
    subset_records = load_pool_manifest(store, pool_ref, columns=["raw_json"], where=pl.col("id").is_in(selected_ids.implode()))
    subset_records = subset_records["raw_json"].to_list()
    voted = np.stack([frame[f"vote__{b}"].to_numpy() for b in benchmarks], axis=1)
    families = family_column(load_pool_manifest(store, pool_ref, columns=["id", "family"]), ids)
    metadata: dict[str, Any] = {
        "n_selected": chosen.n_selected,
        "n_pool": len(ids),
        "p": selection.p,
        "aggregation": selection.method,
        "cutoff_value": chosen.cutoff_score,
        "n_tied_at_cutoff": chosen.n_tied_at_cutoff,
        "n_decided_by_tiebreak": chosen.n_decided_by_tiebreak,
        "tie_break": f"aggregate desc, then {selection.tiebreak.replace('-rank', '')} per-benchmark percentile rank desc, then sha256(id) asc, then id",
        "coverage": selection.coverage,
        "n_reserved": chosen.n_reserved,
        "n_by_coverage": chosen.n_by_coverage,
        "benchmark_coverage": analysis.benchmark_coverage(chosen.selected, voted, benchmarks),
        "selected_votes_histogram": {
            str(v): int(((frame["votes"].to_numpy() == v) & chosen.selected).sum()) for v in range(len(benchmarks) + 1)
        },
        "lineage": lineage,
        "plots": {
            "votes_histogram": plots.markdown_image(
                plots.votes_histogram_png(frame["votes"].to_numpy(), len(benchmarks), chosen.selected), "votes"
            )
        },
    }
    if families is not None:
        metadata["family_shares"] = analysis.family_shares(chosen.selected, families)
    with stage.building({"vote_table": vote_ref.fingerprint, "training_pool": pool_ref.fingerprint}) as out:
        (out.folder / SUBSET_JSON).write_text("[" + ",\n".join(subset_records) + "]\n", encoding="utf-8")
        frame.sort("rank").write_parquet(out.folder / SUBSET_PARQUET)
        out.ref = {"n_selected": chosen.n_selected, "benchmarks": benchmarks}
        out.metadata = metadata
    return stage.result()


def export_subset(store: ArtifactStore, subset: StoredArtifact, prefix: str = "") -> dict[str, str]:
    """Copy the subset to the stable export path (atomic per file, each checked against its
    manifest from the bytes copied); ``prefix`` names the method. Returns the absolute export
    paths by kind ("json", "parquet"), for the metadata."""
    store.exports_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, name in (("json", SUBSET_JSON), ("parquet", SUBSET_PARQUET)):
        target = store.export_path(f"{prefix}{name}")
        tmp = temporary_sibling(target)
        try:
            with open(tmp, "wb") as sink:
                subset.copy(name, sink)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        paths[kind] = str(target)
    return paths
