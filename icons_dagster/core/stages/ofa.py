"""The OFA stages over the artifact store, beside the ICONS ones (no Dagster here).

ofa_embeddings[shard] -> ofa_pseudo_labels -> ofa_selector -> ofa_selected_subset. Each
stage is fingerprinted and built atomically like the ICONS stages. A selector trained
elsewhere can be imported instead of trained (``selector_source``): the pseudo labels are
then not computed, and the selector's embedder fingerprint must match this pool's.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from icons_dagster.core.selection import analysis
from icons_dagster.core import plots
from icons_dagster.core.ofa.embedding import EmbedderConfig, embed_records, load_embedder
from icons_dagster.core.storage.fingerprint import file_sha256, fingerprint
from icons_dagster.core.ofa.selector import (
    SELECTOR_CONFIG,
    SELECTOR_WEIGHTS,
    OFAConfig,
    confidence_scores,
    kmeans,
    load_selector,
    select_least_confident,
    selector_probabilities,
    train_selector,
)
from icons_dagster.core.stages.icons import SUBSET_JSON, SUBSET_PARQUET, export_subset, family_column, load_pool_manifest
from icons_dagster.core.stages.kit import Log, Progress, Stage, StageResult, quiet_log
from icons_dagster.core.data.pool import records_from_manifest
from icons_dagster.core.model.samples import SkipLog
from icons_dagster.core.storage.artifacts import ArtifactStore, load_npy, save_npy, temporary_sibling
from icons_dagster.core.storage.refs import EmbeddingsRef, PoolRef, PseudoLabelsRef, SelectorRef


EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.parquet"
LABELS_FILE = "pseudo_labels.parquet"
CENTROIDS_FILE = "centroids.npy"
SELECTOR_DIR = "selector"
EXPORT_PREFIX = "ofa_"


def embedder_fingerprint(config: EmbedderConfig) -> str:
    """One string naming the embedding space (what a saved selector is tied to)."""
    return fingerprint("ofa_embedder", **load_embedder(config).fingerprint_fields())


# -- ofa_embeddings -------------------------------------------------------------------------


def stage_ofa_embeddings(
    store: ArtifactStore,
    shard: str,
    pool_ref: PoolRef,
    embedder: EmbedderConfig,
    log: Log = quiet_log,
    progress: Progress | None = None,
    *,
    image_root: Path | None,
) -> StageResult:
    """``image_root``: the configured one, where the pool's images are now."""
    space = embedder_fingerprint(embedder)
    stage = Stage(store, "ofa_embeddings", shard, pool=pool_ref.fingerprint, embedder=space, text=embedder.text)
    if (reused := stage.reused()) is not None:
        return reused
    records = records_from_manifest(load_pool_manifest(store, pool_ref, where=pl.col("shard") == shard), image_root)
    log(f"{shard}: embedding {len(records)} records ({embedder.kind})")
    skips = SkipLog()
    ids, vectors = embed_records(records, load_embedder(embedder), embedder, skips, progress)
    with stage.building({"training_pool": pool_ref.fingerprint, "embedder": space}) as out:
        save_npy(out.folder / EMBEDDINGS_FILE, vectors.astype(np.float16))
        pl.DataFrame({"id": ids}, schema={"id": pl.String}).write_parquet(out.folder / IDS_FILE)
        out.ref = {"n_samples": len(ids), "shard": shard, "embedder": space, "dim": int(vectors.shape[1])}
        out.metadata = {
            "shard": shard,
            "n_samples": len(ids),
            "dim": int(vectors.shape[1]),
            "embedder_kind": embedder.kind,
            "embedder": embedder.name_or_path or "(default)",
            "embedder_fingerprint": space,
            **skips.as_metadata(),
        }
    return stage.result()


def load_pool_embeddings(store: ArtifactStore, embedding_refs: dict[str, EmbeddingsRef]) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, shard of each id, float16 [N, d]) over every shard, in shard-key order."""
    ids: list[str] = []
    shards: list[str] = []
    blocks = []
    for shard in sorted(embedding_refs):
        directory = store.absolute(embedding_refs[shard].path)
        shard_ids = pl.read_parquet(directory / IDS_FILE)["id"].to_list()
        block = load_npy(directory / EMBEDDINGS_FILE)
        if block.shape[0] != len(shard_ids):
            raise ValueError(f"{directory}: {block.shape[0]} embeddings for {len(shard_ids)} ids")
        ids += shard_ids
        shards += [shard] * len(shard_ids)
        blocks.append(block)
    spaces = {ref.embedder for ref in embedding_refs.values()}
    if len(spaces) > 1:
        raise ValueError(f"ofa_embeddings shards come from different embedders: {sorted(spaces)}")
    if not blocks:
        raise ValueError("no ofa_embeddings shard to read")
    return ids, shards, np.concatenate(blocks)


def _embedding_inputs(embedding_refs: dict[str, EmbeddingsRef]) -> dict[str, str]:
    return {shard: embedding_refs[shard].fingerprint for shard in sorted(embedding_refs)}


# -- ofa_pseudo_labels ----------------------------------------------------------------------


def stage_ofa_pseudo_labels(
    store: ArtifactStore,
    pool_ref: PoolRef,
    embedding_refs: dict[str, EmbeddingsRef],
    config: OFAConfig,
    selector_source: Path | None = None,
    log: Log = quiet_log,
    progress: Progress | None = None,
) -> StageResult:
    """k-means clusters of the pool's embeddings: the selector's training labels."""
    inputs = _embedding_inputs(embedding_refs)
    if selector_source is not None:
        stage = Stage(store, "ofa_pseudo_labels", imported=selector_content(Path(selector_source)))
        if (reused := stage.reused()) is not None:
            return reused
        with stage.building({"selector_source": str(selector_source)}) as out:
            out.ref = {"computed": False}
            out.metadata = {"computed": False, "why": f"a trained selector is imported from {selector_source}"}
        return stage.result()
    stage = Stage(store, "ofa_pseudo_labels", embeddings=inputs, kmeans=config.kmeans_fields())
    if (reused := stage.reused()) is not None:
        return reused
    ids, shards, x = load_pool_embeddings(store, embedding_refs)
    log(f"k-means: {len(ids)} records, k={config.num_clusters}")
    result = kmeans(x, config.num_clusters, config.kmeans_seed, config.kmeans_iterations, config.kmeans_init_sample, progress=progress)
    sizes = np.bincount(result.labels, minlength=config.num_clusters)
    metadata: dict[str, Any] = {
        "n_records": len(ids),
        "num_clusters": config.num_clusters,
        "iterations": result.iterations,
        "converged": result.converged,
        "inertia": result.inertia,
        "reseeded_empty_clusters": result.reseeded,
        "cluster_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "plots": {
            "cluster_sizes": plots.markdown_image(
                plots.histogram_png(sizes.astype(np.float64), "records per cluster", "cluster size"), "cluster sizes"
            )
        },
    }
    families = family_column(load_pool_manifest(store, pool_ref, columns=["id", "family"]), ids)
    if families is not None:
        metadata["cluster_family_purity"] = cluster_purity(result.labels, families)
    with stage.building({"ofa_embeddings": inputs}) as out:
        pl.DataFrame({"id": ids, "shard": shards, "cluster": result.labels, "distance": np.sqrt(result.sq_distances)}).write_parquet(
            out.folder / LABELS_FILE
        )
        save_npy(out.folder / CENTROIDS_FILE, result.centroids)
        out.ref = {"computed": True, "n_records": len(ids), "num_clusters": config.num_clusters}
        out.metadata = metadata
    return stage.result()


def cluster_purity(labels: np.ndarray, families: list[str]) -> float:
    """Share of records whose cluster's most common family is their own (1.0 = clusters never mix families)."""
    frame = pl.DataFrame({"cluster": labels, "family": families})
    majority = frame.group_by(["cluster", "family"]).len().group_by("cluster").agg(pl.col("len").max())
    return float(majority["len"].sum() / max(1, len(families)))


# -- ofa_selector ---------------------------------------------------------------------------


def stage_ofa_selector(
    store: ArtifactStore,
    embedding_refs: dict[str, EmbeddingsRef],
    labels_ref: PseudoLabelsRef,
    config: OFAConfig,
    embedder: EmbedderConfig,
    selector_source: Path | None = None,
    log: Log = quiet_log,
    progress: Progress | None = None,
) -> StageResult:
    """Train the selector on the pseudo labels, or import a trained one (checked against the embedder)."""
    space = embedder_fingerprint(embedder)
    if selector_source is not None:
        return _import_selector(store, Path(selector_source), space, log)
    stage = Stage(store, "ofa_selector", labels=labels_ref.fingerprint, embedder=space, training=config.selector_fields())
    if (reused := stage.reused()) is not None:
        return reused
    if not labels_ref.computed:
        raise ValueError("ofa_pseudo_labels were not computed (a selector import is configured): nothing to train on")
    ids, _, x = load_pool_embeddings(store, embedding_refs)
    labels_frame = pl.read_parquet(store.absolute(labels_ref.path) / LABELS_FILE)
    if labels_frame["id"].to_list() != ids:
        raise ValueError("ofa_pseudo_labels cover other records than ofa_embeddings: materialize ofa_pseudo_labels again")
    log(f"training the selector on {len(ids)} records, {config.num_clusters} pseudo labels")
    selector = train_selector(x, labels_frame["cluster"].to_numpy(), config, space, progress)
    selector.training["pool_records"] = len(ids)
    with stage.building({"ofa_pseudo_labels": labels_ref.fingerprint, "embedder": space}) as out:
        selector.save(out.folder / SELECTOR_DIR)
        history = selector.training["history"]
        out.ref = {"embedder": space, "imported_from": None, "num_clusters": config.num_clusters}
        out.metadata = {
            "imported": False,
            "embedder_fingerprint": space,
            "n_train": len(ids),
            "epochs": selector.training["epochs"],
            "steps": selector.training["steps"],
            "history": history,
            "final_accuracy": history[-1]["accuracy"],
            "parameters": int(sum(p.numel() for p in selector.model.parameters())),
        }
    return stage.result()


def _import_selector(store: ArtifactStore, source: Path, space: str, log: Log) -> StageResult:
    """Copy a trained selector into the store after checking it loads and fits this embedder."""
    selector = load_selector(source, expected_embedder_fingerprint=space)
    content = selector_content(source)
    stage = Stage(store, "ofa_selector", imported=content, embedder=space)
    if (reused := stage.reused()) is not None:
        return reused
    log(f"importing the trained selector from {source}")
    with stage.building({"selector_source": str(source), "content_sha256": content}) as out:
        (out.folder / SELECTOR_DIR).mkdir()
        for name in (SELECTOR_CONFIG, SELECTOR_WEIGHTS):
            shutil.copyfile(source / name, out.folder / SELECTOR_DIR / name)
        out.ref = {"embedder": space, "imported_from": str(source), "num_clusters": selector.num_clusters}
        out.metadata = {
            "imported": True,
            "source": str(source),
            "embedder_fingerprint": space,
            "trained_on_records": selector.training.get("pool_records"),
            "num_clusters": selector.num_clusters,
        }
    return stage.result()


def selector_content(source: Path) -> dict[str, str]:
    """A trained selector folder by content (its files' sha256), wherever it sits."""
    missing = [name for name in (SELECTOR_CONFIG, SELECTOR_WEIGHTS) if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: no {', '.join(missing)}: ofa.selector must name a trained selector folder (e.g. exports/ofa_selector)")
    return {name: file_sha256(source / name) for name in (SELECTOR_CONFIG, SELECTOR_WEIGHTS)}


def selector_dir(store: ArtifactStore, selector_ref: SelectorRef) -> Path:
    return store.absolute(selector_ref.path) / SELECTOR_DIR


# -- ofa_selected_subset --------------------------------------------------------------------


def stage_ofa_selected_subset(
    store: ArtifactStore,
    pool_ref: PoolRef,
    embedding_refs: dict[str, EmbeddingsRef],
    selector_ref: SelectorRef,
    config: OFAConfig,
    lineage: dict | None = None,
) -> StageResult:
    """Every record's confidence under the selector, and the least-confident floor(pN)."""
    stage = Stage(
        store,
        "ofa_selected_subset",
        pool=pool_ref.fingerprint,
        embeddings=_embedding_inputs(embedding_refs),
        selector=selector_ref.fingerprint,
        **config.subset_fields(),
    )
    result = stage.reused()
    if result is None:
        result = _build_ofa_subset(stage, pool_ref, embedding_refs, selector_ref, config, lineage or {})
    exports = {**export_subset(store, store.stored(result.ref.path), prefix=EXPORT_PREFIX), "selector": str(export_selector(store, selector_ref))}
    return dataclasses.replace(result, metadata={**result.metadata, "exports": exports})


def _build_ofa_subset(stage: Stage, pool_ref: PoolRef, embedding_refs: dict[str, EmbeddingsRef], selector_ref: SelectorRef, config: OFAConfig, lineage: dict) -> StageResult:
    store = stage.store
    ids, shards, x = load_pool_embeddings(store, embedding_refs)
    selector = load_selector(selector_dir(store, selector_ref), expected_embedder_fingerprint=selector_ref.embedder)
    probabilities = selector_probabilities(selector, x)
    measures = confidence_scores(probabilities)
    confidence = measures[config.confidence]
    chosen = select_least_confident(ids, confidence, config.p)
    frame = pl.DataFrame(
        {
            "id": ids,
            "shard": shards,
            "confidence": confidence,
            **{f"confidence_{name}": values for name, values in measures.items()},
            "predicted_cluster": probabilities.argmax(axis=1).astype(np.int32),
            "rank": chosen.rank,
            "selected": chosen.selected,
        }
    )
    selected_ids = frame.filter(pl.col("selected"))["id"]
    subset_records = load_pool_manifest(store, pool_ref, columns=["raw_json"], where=pl.col("id").is_in(selected_ids.implode()))
    predicted = frame["predicted_cluster"].to_numpy()
    clusters_predicted = len(np.unique(predicted))
    metadata: dict[str, Any] = {
        "n_selected": chosen.n_selected,
        "n_pool": len(ids),
        "n_skipped_by_embedding": pool_ref.n_records - len(ids),
        "p": config.p,
        "confidence_measure": config.confidence,
        "cutoff_confidence": -chosen.cutoff_score,
        "n_tied_at_cutoff": chosen.n_tied_at_cutoff,
        "n_decided_by_tiebreak": chosen.n_decided_by_tiebreak,
        "tie_break": "confidence asc, then sha256(id) asc, then id",
        # a selector that never predicts some clusters has not learned them: their records
        # then all look uncertain and crowd the subset (train longer or at a higher rate)
        "clusters_predicted": f"{clusters_predicted} of {selector.num_clusters}",
        "clusters_in_subset": len(np.unique(predicted[chosen.selected])),
        "selector": selector_ref.fingerprint,
        "selector_imported_from": selector_ref.imported_from,
        "lineage": lineage,
        "plots": {
            "confidence_histogram": plots.markdown_image(
                plots.histogram_png(confidence, f"selector confidence ({config.confidence})", "confidence", -chosen.cutoff_score),
                "confidence",
            )
        },
    }
    families = family_column(load_pool_manifest(store, pool_ref, columns=["id", "family"]), ids)
    if families is not None:
        metadata["family_shares"] = analysis.family_shares(chosen.selected, families)
    with stage.building({"ofa_selector": selector_ref.fingerprint, "training_pool": pool_ref.fingerprint}) as out:
        (out.folder / SUBSET_JSON).write_text("[" + ",\n".join(subset_records["raw_json"].to_list()) + "]\n", encoding="utf-8")
        frame.sort("rank").write_parquet(out.folder / SUBSET_PARQUET)
        out.ref = {"n_selected": chosen.n_selected, "method": "ofa"}
        out.metadata = metadata
    return stage.result()


def export_selector(store: ArtifactStore, selector_ref: SelectorRef) -> Path:
    """The trained selector at a stable path (``exports/ofa_selector``), ready to reuse on another pool."""
    target = store.export_path(EXPORT_PREFIX + SELECTOR_DIR)
    tmp = temporary_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(selector_dir(store, selector_ref), tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
