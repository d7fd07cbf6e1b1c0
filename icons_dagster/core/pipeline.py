"""The ICONS stages as plain functions over the artifact store (no Dagster here).

Each stage derives its fingerprint from its config and its inputs' fingerprints, reuses a
complete artifact with that fingerprint, or builds one atomically. It returns a small
reference (what downstream stages need) and metadata (what a user inspects). Assets are
thin wrappers around these functions.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from icons_dagster.core import analysis, consensus, plots
from icons_dagster.core.config import GradientConfig, LoraSettings, ModelConfig, SelectionConfig, WarmupConfig
from icons_dagster.core.encoding import ConversationEncoder
from icons_dagster.core.features import FeatureSet, compute_features, features_file, load_features, load_samples
from icons_dagster.core.fingerprint import checkpoint_identity, fingerprint
from icons_dagster.core.gradients import FEATURES_VERSION
from icons_dagster.core.influence import (
    full_influence_matrix,
    iter_npy_rows,
    influence_scores_from_files,
    mean_validation_feature,
    stack_group_means,
    weighted_influence,
)
from icons_dagster.core.model import Placement, attach_new_lora, load_base_model, load_lora, load_processor, resolve_placement
from icons_dagster.core.pool import MANIFEST_FILE, PROBLEMS_FILE, build_manifest, records_from_manifest
from icons_dagster.core.projection import make_projector
from icons_dagster.core.benchmarks import load_benchmark
from icons_dagster.core.records import benchmark_image_root, load_records
from icons_dagster.core.samples import SkipLog
from icons_dagster.core.store import ArtifactStore, save_npy, write_json
from icons_dagster.core.warmup import checkpoint_weights, load_moments, train_warmup, warmup_indices

Log = Callable[[str], None]
Progress = Callable[[int, int], None]

VOTE_TABLE_FILE = "vote_table.parquet"
INFLUENCE_FILE = "influence.parquet"
SUBSET_JSON = "selected_subset.json"
SUBSET_PARQUET = "selected_subset.parquet"


def quiet_log(_: str) -> None:
    """The default log: stages run silently unless given one."""


@dataclass
class StageResult:
    ref: dict[str, Any]  # fingerprint, path (relative to the store root), summary for downstream stages
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON values; "plots": {name: markdown}


def _finish(store: ArtifactStore, stage: str, fp: str, directory: Path, metadata: dict, extra_ref: dict, reused: bool) -> StageResult:
    ref = {"stage": stage, "fingerprint": fp, "path": store.relative(directory), "reused": reused, **extra_ref}
    return StageResult(ref=ref, metadata={**metadata, "fingerprint": fp, "reused": reused})


# When each stage found no artifact to reuse and started computing: "seconds" in an
# artifact's metadata covers the work (model loads included), not only the writing.
_STARTED: dict[Path, float] = {}


def reuse_artifact(store: ArtifactStore, stage: str, fp: str, directory: Path, *, built: bool = False) -> StageResult | None:
    """The complete artifact at ``directory`` as a result (``built``: it was just written)."""
    if not store.is_complete(directory):
        _STARTED[directory] = time.perf_counter()
        return None
    manifest = store.read_manifest(directory)
    return _finish(store, stage, fp, directory, manifest.get("metadata", {}), manifest.get("ref", {}), reused=not built)


@contextmanager
def building_artifact(store: ArtifactStore, directory: Path, stage: str, fp: str, inputs: dict) -> Iterator[tuple[Path, dict]]:
    """Yield (tmp folder, manifest dict to fill with "metadata" and "ref"); commit on exit.

    ``inputs`` (the fingerprints of what this artifact was made from) is recorded in its
    metadata: the lineage a user reads in the UI.
    """
    manifest: dict[str, Any] = {"stage": stage, "fingerprint": fp, "metadata": {}, "ref": {}}
    start = _STARTED.pop(directory, time.perf_counter())
    with store.writing(directory, manifest) as tmp:
        yield tmp, manifest
        manifest["metadata"]["seconds"] = round(time.perf_counter() - start, 3)
        manifest["metadata"]["inputs"] = inputs


# -- models -------------------------------------------------------------------------------


class ModelCache:
    """Processors and base models loaded once per process (CLI runs reuse them across steps)."""

    def __init__(self) -> None:
        self._entries: dict[ModelConfig, tuple[Any, Any, Placement]] = {}

    def get(self, config: ModelConfig) -> tuple[Any, Any, Placement]:
        if config not in self._entries:
            placement = resolve_placement(config)
            processor = load_processor(config)
            self._entries[config] = (processor, load_base_model(config, placement), placement)
        return self._entries[config]

    def encoder(self, config: ModelConfig) -> ConversationEncoder:
        return ConversationEncoder(self.get(config)[0], config.max_length)

    @contextmanager
    def with_adapter(self, config: ModelConfig, adapter_dir: Path | None, lora: LoraSettings | None = None, seed: int = 0):
        """The base model wrapped in a saved adapter (or a fresh one); unwrapped again afterwards."""
        _, base, _ = self.get(config)
        peft_model = load_lora(base, adapter_dir) if adapter_dir is not None else attach_new_lora(base, lora, seed)
        try:
            yield peft_model
        finally:
            restored = peft_model.unload()
            restored.eval()
            for parameter in restored.parameters():
                parameter.requires_grad_(False)


MODELS = ModelCache()


def model_fingerprint_fields(config: ModelConfig) -> dict:
    """What identifies the weights: a local folder by content (so every machine of a
    scale-out agrees wherever it mounts the folder, and a checkpoint replaced in place is
    recomputed), a hub id by id, revision and cached commit; then the numerics, not the device."""
    return {
        **checkpoint_identity(config.name_or_path, config.revision),
        "dtype": config.dtype,
        "autocast": config.autocast,
        "max_length": config.max_length,
    }


# -- what each stage's fingerprint takes from the configuration (also its code version) ----


def pool_settings(image_root: Path | str | None, num_shards: int) -> dict:
    return {"image_root": str(image_root), "num_shards": num_shards}


def warmup_subset_settings(config: WarmupConfig) -> dict:
    return {"ratio": config.ratio, "seed": config.seed}


def warmup_checkpoint_settings(model_config: ModelConfig, lora: LoraSettings, config: WarmupConfig) -> dict:
    return {"model": model_fingerprint_fields(model_config), "lora": lora, "warmup": config}


def influence_settings(p: float, write_full_matrix: bool) -> dict:
    return {"p": p, "full_matrix": write_full_matrix}


# -- training_pool ------------------------------------------------------------------------


def stage_pool(store: ArtifactStore, pool_path: Path, image_root: Path | None, num_shards: int, log: Log = quiet_log) -> StageResult:
    from icons_dagster.core.fingerprint import file_sha256

    content = file_sha256(pool_path)
    fp = fingerprint("training_pool", content=content, **pool_settings(image_root, num_shards))
    directory = store.artifact_dir("training_pool", fp)
    if (reused := reuse_artifact(store, "training_pool", fp, directory)) is not None:
        return reused
    log(f"validating pool {pool_path}")
    loaded = load_records(pool_path, image_root)
    if not loaded.records:
        first = "; ".join(str(p) for p in loaded.problems[:3])
        raise ValueError(f"{pool_path}: no valid record ({len(loaded.problems)} invalid, e.g. {first})")
    manifest_df = build_manifest(loaded.records, num_shards)
    with building_artifact(store, directory, "training_pool", fp, {"pool_content_sha256": content, "image_root": str(image_root)}) as (tmp, manifest):
        manifest_df.write_parquet(tmp / MANIFEST_FILE)
        write_json(tmp / PROBLEMS_FILE, [problem_dict(p) for p in loaded.problems])
        shard_counts = dict(sorted(manifest_df.group_by("shard").len().iter_rows()))
        manifest["ref"] = {"n_records": manifest_df.height, "num_shards": num_shards, "source": str(pool_path), "content_sha256": content}
        manifest["metadata"] = {
            "source": str(pool_path),
            "n_records": manifest_df.height,
            "n_text_only": int(manifest_df["image"].is_null().sum()),
            "n_multi_turn": int((manifest_df["n_turns"] > 2).sum()),
            "skipped_count": len(loaded.problems),
            "skipped": [problem_dict(p) for p in loaded.problems[:50]],
            "records_per_shard": shard_counts,
            "content_sha256": content,
        }
    log(f"pool: {manifest_df.height} valid records, {len(loaded.problems)} skipped")
    return reuse_artifact(store, "training_pool", fp, directory, built=True)


def problem_dict(problem) -> dict:
    return {"file": problem.file, "index": problem.index, "id": problem.record_id, "reason": problem.reason}


def load_pool_manifest(
    store: ArtifactStore, pool_ref: dict, columns: list[str] | None = None, where: pl.Expr | None = None
) -> pl.DataFrame:
    """The manifest, or only some of its columns / rows (read lazily: it holds every record's JSON)."""
    frame = pl.scan_parquet(store.absolute(pool_ref["path"]) / MANIFEST_FILE)
    if where is not None:
        frame = frame.filter(where)
    if columns is not None:
        frame = frame.select(columns)
    return frame.collect()


# -- warmup_subset ------------------------------------------------------------------------


def stage_warmup_subset(store: ArtifactStore, pool_ref: dict, config: WarmupConfig) -> StageResult:
    fp = fingerprint("warmup_subset", pool=pool_ref["fingerprint"], **warmup_subset_settings(config))
    directory = store.artifact_dir("warmup_subset", fp)
    if (reused := reuse_artifact(store, "warmup_subset", fp, directory)) is not None:
        return reused
    manifest_df = load_pool_manifest(store, pool_ref, columns=["id"])
    chosen = warmup_indices(manifest_df.height, config.ratio, config.seed)
    ids = manifest_df["id"].gather(chosen)
    with building_artifact(store, directory, "warmup_subset", fp, {"training_pool": pool_ref["fingerprint"]}) as (tmp, manifest):
        pl.DataFrame({"id": ids}).write_parquet(tmp / "ids.parquet")
        manifest["ref"] = {"n_records": len(ids)}
        manifest["metadata"] = {"n_records": len(ids), "ratio": config.ratio, "seed": config.seed}
    return reuse_artifact(store, "warmup_subset", fp, directory, built=True)


# -- warmup_checkpoint --------------------------------------------------------------------


def stage_warmup_checkpoint(
    store: ArtifactStore,
    pool_ref: dict,
    subset_ref: dict,
    model_config: ModelConfig,
    lora: LoraSettings,
    config: WarmupConfig,
    models: ModelCache = MODELS,
    log: Log = quiet_log,
    progress: Callable[[int, int, float], None] | None = None,
) -> StageResult:
    fp = fingerprint("warmup_checkpoint", subset=subset_ref["fingerprint"], **warmup_checkpoint_settings(model_config, lora, config))
    directory = store.artifact_dir("warmup_checkpoint", fp)
    if (reused := reuse_artifact(store, "warmup_checkpoint", fp, directory)) is not None:
        return reused
    subset_ids = pl.read_parquet(store.absolute(subset_ref["path"]) / "ids.parquet")["id"]
    records = records_from_manifest(load_pool_manifest(store, pool_ref, where=pl.col("id").is_in(subset_ids.implode())))
    encoder = models.encoder(model_config)
    placement = models.get(model_config)[2]
    skips = SkipLog()
    with building_artifact(store, directory, "warmup_checkpoint", fp, {"warmup_subset": subset_ref["fingerprint"], "model": model_fingerprint_fields(model_config)}) as (tmp, manifest):
        log(f"warm-up: {len(records)} records, {config.epochs} epoch(s), {config.num_checkpoints} checkpoint(s)")
        with models.with_adapter(model_config, None, lora, config.seed) as peft_model:
            checkpoints = train_warmup(peft_model, encoder, records, config, placement, tmp, skips, progress)
        weights = checkpoint_weights([c.mean_learning_rate for c in checkpoints])
        entries = [
            {"index": c.index, "step": c.step, "mean_learning_rate": c.mean_learning_rate, "weight": w, "dir": f"checkpoint-{c.index}"}
            for c, w in zip(checkpoints, weights, strict=True)
        ]
        write_json(tmp / "checkpoints.json", entries)
        manifest["ref"] = {"checkpoints": entries, "model": model_fingerprint_fields(model_config)}
        manifest["metadata"] = {
            "n_records": len(records),
            "checkpoints": entries,
            "model": model_config.name_or_path,
            "lora_r": lora.r,
            "lora_alpha": lora.alpha,
            **skips.as_metadata(),
        }
    return reuse_artifact(store, "warmup_checkpoint", fp, directory, built=True)


# -- gradient features ----------------------------------------------------------------------


def _features(
    store: ArtifactStore,
    records,
    checkpoint_ref: dict,
    model_config: ModelConfig,
    gradients: GradientConfig,
    gradient_type: str,
    models: ModelCache,
    progress: Progress | None,
) -> FeatureSet:
    """Features at every warm-up checkpoint: its adapter loaded once onto the base weights."""
    ckpt_dir = store.absolute(checkpoint_ref["path"])
    folders = [ckpt_dir / entry["dir"] for entry in checkpoint_ref["checkpoints"]]
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
    pool_ref: dict,
    checkpoint_ref: dict,
    model_config: ModelConfig,
    gradients: GradientConfig,
    models: ModelCache = MODELS,
    log: Log = quiet_log,
    progress: Progress | None = None,
) -> StageResult:
    gradient_type = gradients.train_gradient
    fp = fingerprint(
        "training_gradients",
        pool=pool_ref["fingerprint"],
        checkpoint=checkpoint_ref["fingerprint"],
        gradients=gradient_fingerprint_fields(gradients, gradient_type),
    )
    directory = store.artifact_dir("training_gradients", fp, shard)
    if (reused := reuse_artifact(store, "training_gradients", fp, directory)) is not None:
        return reused
    records = records_from_manifest(load_pool_manifest(store, pool_ref, where=pl.col("shard") == shard))
    log(f"{shard}: gradient features of {len(records)} records")
    features = _features(store, records, checkpoint_ref, model_config, gradients, gradient_type, models, progress)
    with building_artifact(store, directory, "training_gradients", fp, {"training_pool": pool_ref["fingerprint"], "warmup_checkpoint": checkpoint_ref["fingerprint"]}) as (tmp, manifest):
        features.save(tmp)
        manifest["ref"] = {"n_samples": len(features.ids), "shard": shard}
        manifest["metadata"] = {"shard": shard, **_feature_metadata(features, gradients, gradient_type)}
    return reuse_artifact(store, "training_gradients", fp, directory, built=True)


def stage_validation(
    store: ArtifactStore,
    benchmark: str,
    benchmarks_dir: Path,
    default_image_root: Path | None,
    checkpoint_ref: dict,
    model_config: ModelConfig,
    gradients: GradientConfig,
    models: ModelCache = MODELS,
    log: Log = quiet_log,
    progress: Progress | None = None,
) -> StageResult:
    loaded = load_benchmark(benchmarks_dir, benchmark, default_image_root)
    fp = fingerprint(
        "validation_gradients",
        benchmark=benchmark,
        content=loaded.content_sha256,
        image_root=str(benchmark_image_root(Path(benchmarks_dir) / benchmark, default_image_root)),
        checkpoint=checkpoint_ref["fingerprint"],
        gradients=gradient_fingerprint_fields(gradients, "sgd"),
    )
    directory = store.artifact_dir("validation_gradients", fp, benchmark)
    if (reused := reuse_artifact(store, "validation_gradients", fp, directory)) is not None:
        return reused
    if not loaded.records:
        raise ValueError(f"benchmark {benchmark!r}: no valid validation records in {loaded.path} ({len(loaded.problems)} skipped)")
    log(f"{benchmark}: gradient features of {len(loaded.records)} validation records")
    features = _features(store, loaded.records, checkpoint_ref, model_config, gradients, "sgd", models, progress)
    if not features.ids:
        raise ValueError(f"benchmark {benchmark!r}: every validation record was skipped: {features.skips.entries[:5]}")
    for skip_id, reason in [(p.record_id or f"#{p.index}", p.reason) for p in loaded.problems]:
        features.skips.add(skip_id, reason)
    with building_artifact(store, directory, "validation_gradients", fp, {"benchmark_content_sha256": loaded.content_sha256, "warmup_checkpoint": checkpoint_ref["fingerprint"]}) as (tmp, manifest):
        features.save(tmp)
        subtasks = sorted({s for s in features.subtasks if s})
        manifest["ref"] = {"n_samples": len(features.ids), "benchmark": benchmark, "content_sha256": loaded.content_sha256}
        manifest["metadata"] = {
            "benchmark": benchmark,
            "source": str(loaded.path),
            "content_sha256": loaded.content_sha256,
            "subtasks": subtasks,
            **_feature_metadata(features, gradients, "sgd"),
        }
    return reuse_artifact(store, "validation_gradients", fp, directory, built=True)


# -- task_influence -----------------------------------------------------------------------


@dataclass(frozen=True)
class _ValidationSet:
    """One benchmark's stored validation features: where they are and their subtask labels."""

    directory: Path
    subtasks: list[str] | None  # None: the benchmark is one group
    n: int

    @classmethod
    def load(cls, store: ArtifactStore, ref: dict) -> _ValidationSet:
        directory = store.absolute(ref["path"])
        labels = load_samples(directory)["subtask"].to_list()
        return cls(directory, labels if any(s is not None for s in labels) else None, len(labels))

    def means(self, checkpoint: int) -> np.ndarray:
        return mean_validation_feature(load_features(self.directory, checkpoint, mmap=False), self.subtasks)[0]

    def groups(self) -> list[str]:
        return sorted(set(map(str, self.subtasks))) if self.subtasks is not None else []


def stage_influences(
    store: ArtifactStore,
    pool_ref: dict,
    checkpoint_ref: dict,
    train_refs: dict[str, dict],
    validation_refs: dict[str, dict],
    p: float,
    write_full_matrix: bool = False,
    log: Log = quiet_log,
) -> dict[str, StageResult]:
    """Eq. 3 per checkpoint, LR-weighted, for every benchmark in ``validation_refs``.

    The benchmarks without a stored artifact are scored together in ONE streaming pass
    over the training features per checkpoint (each benchmark's scores are bit-identical
    to scoring it alone, see ``influence_scores_from_files``), so materializing K
    benchmarks reads the training shards once, not K times. Each benchmark still gets
    its own artifact and fingerprint. ``write_full_matrix`` also stores the |D| x |V|
    matrix.
    """
    shards = sorted(train_refs)
    train_fingerprints = [train_refs[s]["fingerprint"] + "/" + s for s in shards]
    results: dict[str, StageResult] = {}
    pending: dict[str, tuple[str, Path]] = {}
    for benchmark in sorted(validation_refs):
        fp = fingerprint(
            "task_influence",
            benchmark=benchmark,
            train=train_fingerprints,
            validation=validation_refs[benchmark]["fingerprint"],
            checkpoint=checkpoint_ref["fingerprint"],
            **influence_settings(p, write_full_matrix),
        )
        directory = store.artifact_dir("task_influence", fp, benchmark)
        if (reused := reuse_artifact(store, "task_influence", fp, directory)) is not None:
            results[benchmark] = reused
        else:
            pending[benchmark] = (fp, directory)
    if not pending:
        return results
    weights = [entry["weight"] for entry in checkpoint_ref["checkpoints"]]
    shard_dirs = [store.absolute(train_refs[shard]["path"]) for shard in shards]
    ids: list[str] = []
    shard_col: list[str] = []
    for shard, shard_dir in zip(shards, shard_dirs, strict=True):
        shard_ids = load_samples(shard_dir)["id"].to_list()
        ids += shard_ids
        shard_col += [shard] * len(shard_ids)
    validation = {b: _ValidationSet.load(store, validation_refs[b]) for b in pending}
    per_ckpt_scores: dict[str, list[np.ndarray]] = {b: [] for b in pending}
    for c in range(len(weights)):
        means = [validation[b].means(c) for b in pending]
        stacked, groups = stack_group_means(means)
        paths = [shard_dir / features_file(c) for shard_dir in shard_dirs]
        log(f"influence of {len(pending)} benchmark(s) over {len(ids)} training samples, checkpoint {c}: one streaming pass")
        scores = influence_scores_from_files(paths, stacked, groups)  # [n, K], bounded memory
        for k, benchmark in enumerate(pending):
            per_ckpt_scores[benchmark].append(np.ascontiguousarray(scores[:, k]))
    manifest_df = load_pool_manifest(store, pool_ref, columns=["id", "family"])
    families = family_column(manifest_df, ids)
    for benchmark, (fp, directory) in pending.items():
        results[benchmark] = _write_influence(
            store, benchmark, fp, directory, pool_ref, train_refs, shards, validation_refs[benchmark], validation[benchmark],
            ids, shard_col, families, per_ckpt_scores[benchmark], weights, p, write_full_matrix, list(pending),
        )
    return {b: results[b] for b in sorted(results)}


def _write_influence(
    store: ArtifactStore,
    benchmark: str,
    fp: str,
    directory: Path,
    pool_ref: dict,
    train_refs: dict[str, dict],
    shards: list[str],
    validation_ref: dict,
    validation: _ValidationSet,
    ids: list[str],
    shard_col: list[str],
    families: list[str] | None,
    per_ckpt_scores: list[np.ndarray],
    weights: list[float],
    p: float,
    write_full_matrix: bool,
    scored_together: list[str],
) -> StageResult:
    """One benchmark's influence artifact: the table, its metadata and plots, the optional matrix.

    ``scored_together``: the benchmarks of the shared pass (its ``seconds`` include that pass).
    """
    scores = weighted_influence(per_ckpt_scores, weights)
    table = {"id": ids, "shard": shard_col, "influence": scores.astype(np.float32)}
    for c, values in enumerate(per_ckpt_scores):
        table[f"influence_checkpoint_{c}"] = values.astype(np.float32)
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
    with building_artifact(store, directory, "task_influence", fp, {"training_gradients": {s: train_refs[s]["fingerprint"] for s in shards}, "validation_gradients": validation_ref["fingerprint"]}) as (tmp, manifest):
        frame.write_parquet(tmp / INFLUENCE_FILE)
        if write_full_matrix:
            for c in range(len(weights)):
                val_features = load_features(validation.directory, c, mmap=False)
                matrix = np.concatenate(
                    [full_influence_matrix(load_features(store.absolute(train_refs[s]["path"]), c), val_features) for s in shards]
                )
                save_npy(tmp / f"influence_matrix-checkpoint-{c}.npy", matrix)
        manifest["ref"] = {
            "benchmark": benchmark,
            "n_train": len(ids),
            "benchmark_content_sha256": validation_ref.get("content_sha256"),
            "validation": validation_ref["fingerprint"],
        }
        manifest["metadata"] = metadata
    return reuse_artifact(store, "task_influence", fp, directory, built=True)


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


def stage_vote_table(store: ArtifactStore, influence_refs: dict[str, dict], selection: SelectionConfig) -> StageResult:
    benchmarks = sorted(influence_refs)
    if not benchmarks:
        raise ValueError("no benchmark has been registered and scored: register at least one benchmark partition")
    fp = fingerprint(
        "vote_table", influence=[influence_refs[b]["fingerprint"] + "/" + b for b in benchmarks], selection=selection
    )
    directory = store.artifact_dir("vote_table", fp)
    if (reused := reuse_artifact(store, "vote_table", fp, directory)) is not None:
        return reused
    frames = [pl.read_parquet(store.absolute(influence_refs[b]["path"]) / INFLUENCE_FILE) for b in benchmarks]
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
    for method in ("mean", "max", "rank", "norm"):
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
    with building_artifact(store, directory, "vote_table", fp, {"task_influence": {b: influence_refs[b]["fingerprint"] for b in benchmarks}}) as (tmp, manifest):
        frame.write_parquet(tmp / VOTE_TABLE_FILE)
        write_json(tmp / "thresholds.json", metadata["thresholds"])
        manifest["ref"] = {
            "benchmarks": benchmarks,
            "n_samples": len(ids),
            "influence": {b: influence_refs[b]["fingerprint"] for b in benchmarks},
            "benchmark_content_sha256": {b: influence_refs[b].get("benchmark_content_sha256") for b in benchmarks},
        }
        manifest["metadata"] = metadata
    return reuse_artifact(store, "vote_table", fp, directory, built=True)


# -- selected_subset ----------------------------------------------------------------------


def stage_selected_subset(
    store: ArtifactStore, pool_ref: dict, vote_ref: dict, selection: SelectionConfig, lineage: dict | None = None
) -> StageResult:
    fp = fingerprint("selected_subset", votes=vote_ref["fingerprint"], pool=pool_ref["fingerprint"], selection=selection)
    directory = store.artifact_dir("selected_subset", fp)
    result = reuse_artifact(store, "selected_subset", fp, directory)
    if result is None:
        result = _build_subset(store, fp, directory, pool_ref, vote_ref, selection, lineage or {})
    export_subset(store, directory)
    return result


def _build_subset(store, fp, directory, pool_ref, vote_ref, selection, lineage) -> StageResult:
    frame = pl.read_parquet(store.absolute(vote_ref["path"]) / VOTE_TABLE_FILE)
    benchmarks = vote_ref["benchmarks"]
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
    frame = frame.with_columns(pl.Series("rank", chosen.rank), pl.Series("selected", chosen.selected))
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
    with building_artifact(store, directory, "selected_subset", fp, {"vote_table": vote_ref["fingerprint"], "training_pool": pool_ref["fingerprint"]}) as (tmp, manifest):
        (tmp / SUBSET_JSON).write_text("[" + ",\n".join(subset_records) + "]\n", encoding="utf-8")
        frame.sort("rank").write_parquet(tmp / SUBSET_PARQUET)
        manifest["ref"] = {"n_selected": chosen.n_selected, "benchmarks": benchmarks}
        manifest["metadata"] = metadata
    return reuse_artifact(store, "selected_subset", fp, directory, built=True)


def export_subset(store: ArtifactStore, directory: Path, prefix: str = "") -> dict[str, str]:
    """Copy the subset to the stable export path (atomic per file); ``prefix`` names the method."""
    store.exports_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in (SUBSET_JSON, SUBSET_PARQUET):
        target = store.export_path(f"{prefix}{name}")
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(directory / name, tmp)
        tmp.replace(target)
        paths[name] = str(target)
    return paths


# -- checks -------------------------------------------------------------------------------


def check_features(store: ArtifactStore, ref: dict, num_checkpoints: int, tolerance: float = 2e-3) -> tuple[bool, dict]:
    """Every stored feature is finite and unit-norm (float16 rounding within ``tolerance``)."""
    directory = store.absolute(ref["path"])
    return check_unit_rows([directory / features_file(c) for c in range(num_checkpoints)], tolerance)


def check_unit_rows(files: list[Path], tolerance: float = 2e-3) -> tuple[bool, dict]:
    """Every row of every npy file is finite with norm 1 (within ``tolerance``); rows = per file."""
    worst = 0.0
    finite = True
    rows = 0
    for path in files:
        rows = 0
        # Plain chunked reads: a memory map would count every page of the shard in RSS.
        for chunk in iter_npy_rows(path, chunk_rows=65536):
            chunk = chunk.astype(np.float32)
            rows += chunk.shape[0]
            finite &= bool(np.isfinite(chunk).all())
            if chunk.size:
                worst = max(worst, float(np.abs(np.linalg.norm(chunk, axis=1) - 1.0).max()))
    passed = finite and worst <= tolerance
    return passed, {"rows": rows, "finite": finite, "max_norm_error": worst, "tolerance": tolerance}


def check_subset(store: ArtifactStore, ref: dict, n_pool: int, p: float) -> tuple[bool, dict]:
    """The subset JSON parses and holds exactly floor(p N) records."""
    expected = consensus.subset_size(n_pool, p)
    records = json.loads((store.absolute(ref["path"]) / SUBSET_JSON).read_text(encoding="utf-8"))
    ids = [r.get("id") for r in records]
    passed = len(records) == expected and len(set(ids)) == len(ids)
    return passed, {"n_records": len(records), "expected": expected, "fraction": len(records) / max(1, n_pool)}


# -- why is this sample in? ------------------------------------------------------------------


def explain_sample(store: ArtifactStore, subset_ref: dict, vote_ref: dict, sample_id: str) -> dict[str, Any]:
    """A sample's per-benchmark influence, threshold, vote and percentile, its votes and rank."""
    subset_dir = store.absolute(subset_ref["path"])
    frame = pl.read_parquet(subset_dir / SUBSET_PARQUET)
    row = frame.filter(pl.col("id") == sample_id)
    if row.height == 0:
        raise KeyError(f"sample {sample_id!r} is not in the scored pool ({subset_dir / SUBSET_PARQUET})")
    thresholds = json.loads((store.absolute(vote_ref["path"]) / "thresholds.json").read_text(encoding="utf-8"))
    record = row.row(0, named=True)
    per_benchmark = {}
    for name in vote_ref["benchmarks"]:
        column = frame[f"influence__{name}"].to_numpy()
        value = record[f"influence__{name}"]
        per_benchmark[name] = {
            "influence": value,
            "threshold": thresholds[name],
            "vote": bool(record[f"vote__{name}"]),
            "percentile": float((column < value).mean()),
        }
    manifest = store.read_manifest(subset_dir)["metadata"]
    return {
        "id": sample_id,
        "selected": bool(record["selected"]),
        "rank": int(record["rank"]),
        "votes": int(record["votes"]),
        "n_pool": frame.height,
        "n_selected": manifest["n_selected"],
        "aggregation": manifest["aggregation"],
        "cutoff_value": manifest["cutoff_value"],
        "mean_percentile_rank": float(record["mean_percentile_rank"]),
        "benchmarks": per_benchmark,
    }


def explanation_markdown(explanation: dict[str, Any]) -> str:
    verdict = "selected" if explanation["selected"] else "not selected"
    lines = [
        f"**{explanation['id']}**: {verdict}, rank {explanation['rank']} of {explanation['n_pool']} "
        f"(the subset is the top {explanation['n_selected']}; cutoff at {explanation['aggregation']} = {explanation['cutoff_value']}), "
        f"{explanation['votes']} vote(s), mean percentile rank {explanation['mean_percentile_rank']:.3f}",
        "",
        "| benchmark | influence | threshold | vote | percentile |",
        "|---|---|---|---|---|",
    ]
    for name, item in explanation["benchmarks"].items():
        lines.append(f"| {name} | {item['influence']:.4f} | {item['threshold']:.4f} | {'yes' if item['vote'] else 'no'} | {item['percentile']:.3f} |")
    return "\n".join(lines)
