"""The evaluation stages: each method's subset, a fine-tune on it, every benchmark scored, one table.

A selector is only as good as the model trained on what it selects. For every method the
same base model gets the same LoRA recipe (the warm-up trainer: AdamW, cosine, one epoch by
default) on the method's subset; then every benchmark's test split is scored with the
metric that fits its answers (``core/evaluation/metrics.py``), and the table gives Rel. (paper
eq. 2: mean over benchmarks of score / full-data score) and each method's Rel. difference to
the random seeds with a paired bootstrap interval over the per-record scores
(``core/evaluation/statistics.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from icons_dagster.core.selection import analysis, consensus
from icons_dagster.core import plots
from icons_dagster.core.data.benchmarks import declared_answers, load_benchmark
from icons_dagster.core.data.image_hashes import ImageHashCache, images_key
from icons_dagster.core.config import DEFAULT_MAX_IMAGE_PIXELS, LoraSettings, ModelConfig, image_limit_fields
from icons_dagster.core.evaluation.methods import SPECIALIST, EvaluationConfig, parse_method
from icons_dagster.core.evaluation.metrics import informative_benchmarks, relative_scores, results_markdown, score_benchmark
from icons_dagster.core.evaluation.statistics import align_record_scores, bootstrap_rel_differences, format_interval
from icons_dagster.core.storage.fingerprint import fingerprint
from icons_dagster.core.model.cache import MODELS, ModelCache, model_fingerprint_fields
from icons_dagster.core.stages.icons import SUBSET_PARQUET, VOTE_TABLE_FILE, family_column, load_pool_manifest
from icons_dagster.core.stages.kit import Log, Stage, StageResult, quiet_log
from icons_dagster.core.stages.ofa import LABELS_FILE as OFA_LABELS_FILE
from icons_dagster.core.data.pool import record_labels, records_from_manifest
from icons_dagster.core.data.records import split_file
from icons_dagster.core.model.samples import SkipLog
from icons_dagster.core.storage.artifacts import write_json
from icons_dagster.core.stages.visual_dependency import load_visual_dependency
from icons_dagster.core.storage.refs import (
    AdapterRef, EvaluationSubsetsRef, OFASubsetRef, PoolRef, PseudoLabelsRef, ScoresRef, SubsetRef, VisualDependencyRef, VoteTableRef,
)  # fmt: skip


SUBSETS_FILE = "subsets.parquet"
SCORES_FILE = "scores.json"
RECORD_SCORES_FILE = "record_scores.parquet"  # benchmark, id, score: one row per scored test record
TABLE_FILE = "evaluation_table.parquet"
TABLE_MARKDOWN = "evaluation_table.md"
COMPOSITION_FILE = "composition.parquet"  # method, n, wrong_share, mean_vds, one share column per source
INTERVALS_FILE = "rel_vs_random.parquet"  # method, measure (rel | rel_all), difference, low, high, beats_random
INTERVALS_SCHEMA = {
    "method": pl.String, "measure": pl.String, "difference": pl.Float64, "low": pl.Float64, "high": pl.Float64, "beats_random": pl.Boolean
}
# Bump when scoring changes what a benchmark_scores artifact holds (2: chance levels;
# 3: per-record scores).
SCORING_VERSION = 3
# The bootstrap's generator seed: fixed, so a table is reproduced exactly (pre-registered).
BOOTSTRAP_SEED = 0


def subsets_settings(config: EvaluationConfig, p: float) -> dict:
    """What evaluation_subsets' fingerprint takes from the configuration."""
    return {"methods": list(config.compared), "p": p}


def scores_settings(config: EvaluationConfig) -> dict:
    """What benchmark_scores' fingerprint takes from the configuration."""
    return {"max_new_tokens": config.max_new_tokens, "scoring_version": SCORING_VERSION}


def table_settings(config: EvaluationConfig) -> dict:
    """What evaluation_table's fingerprint takes from the configuration: the bootstrap."""
    return {"bootstrap": {"resamples": config.bootstrap_resamples, "seed": BOOTSTRAP_SEED}}


# -- evaluation_subsets ---------------------------------------------------------------------


def direct_merge_scores(vote_frame: pl.DataFrame, n_validation: dict[str, int]) -> np.ndarray:
    """Influence against all validation sets merged into one (paper Table 7).

    Features are unit-norm, so a record's mean cosine to the merged set is the size-weighted
    mean of its per-benchmark mean cosines: sum_k n_k I_k / sum_k n_k (exact for benchmarks
    without subtask groups; with groups, each I_k is already a mean over group means).
    """
    benchmarks = sorted(n_validation)
    weights = np.array([n_validation[b] for b in benchmarks], dtype=np.float64)
    scores = np.stack([vote_frame[f"influence__{b}"].to_numpy() for b in benchmarks], axis=1)
    return scores @ weights / weights.sum()


def text_similarity_scores(pool_texts: list[str], validation_texts: dict[str, list[str]]) -> tuple[list[str], np.ndarray]:
    """[N, K] mean TF-IDF cosine of each pool text to each benchmark's validation texts.

    One vocabulary fitted on the pool and every validation text (deterministic); rows are
    L2-normalized, so the mean cosine is the dot product with the mean validation row.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    benchmarks = sorted(validation_texts)
    vectorizer = TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b\w+\b", ngram_range=(1, 2), min_df=1)
    vectorizer.fit(pool_texts + [t for b in benchmarks for t in validation_texts[b]])
    pool = vectorizer.transform(pool_texts)
    means = np.stack([np.asarray(vectorizer.transform(validation_texts[b]).mean(axis=0)).ravel() for b in benchmarks], axis=1)
    return benchmarks, np.asarray(pool @ means, dtype=np.float64)


def _influence_columns(vote_frame: pl.DataFrame) -> tuple[list[str], np.ndarray]:
    benchmarks = [c.removeprefix("influence__") for c in vote_frame.columns if c.startswith("influence__")]
    return benchmarks, np.stack([vote_frame[f"influence__{b}"].to_numpy() for b in benchmarks], axis=1)


def specialist_subsets(vote_frame: pl.DataFrame, p: float) -> dict[str, list[str]]:
    """Each benchmark's own top-p records by its influence alone (paper Table 3's specialists)."""
    ids = vote_frame["id"].to_list()
    benchmarks, scores = _influence_columns(vote_frame)
    m = consensus.subset_size(len(ids), p)
    return {b: [ids[i] for i in np.flatnonzero(consensus.top_k_mask(ids, scores[:, k], m))] for k, b in enumerate(benchmarks)}


def method_subset(
    method: str,
    ids: list[str],
    p: float,
    vote_frame: pl.DataFrame | None,
    exported: dict[str, pl.DataFrame] | None = None,
    baseline_scores: dict[str, np.ndarray] | None = None,
    group_labels: dict[str, dict[str, str]] | None = None,
) -> list[str]:
    """The ids one method trains on (``ids`` is the pool in manifest order).

    ``exported``: the subset frames (id, selected) the ICONS and OFA graphs wrote.
    ``baseline_scores``: "direct-merge" [N] and "text-vote" [N, K] scores in ``ids`` order.
    ``group_labels``: "source" / "cluster" -> id -> label, for the quota levers.
    """
    spec = parse_method(method)
    if spec.kind == "baseline":
        if not baseline_scores or method not in baseline_scores:
            raise ValueError(f"method {method!r} needs its scores (the vote table and the benchmarks' validation sets)")
        scores = baseline_scores[method]
        chosen = consensus.select(ids, scores.reshape(len(ids), -1), p, method="vote" if method == "text-vote" else "mean")
        return [ids[i] for i in np.flatnonzero(chosen.selected)]
    if spec.kind == "full":
        return list(ids)
    if spec.kind == "random":
        rng = np.random.Generator(np.random.PCG64(spec.seed))
        chosen = np.sort(rng.choice(len(ids), size=consensus.subset_size(len(ids), p), replace=False))
        return [ids[i] for i in chosen]
    if spec.kind == "icons-rule":
        if vote_frame is None:
            raise ValueError(f"method {method!r} needs the ICONS vote table")
        benchmarks, scores = _influence_columns(vote_frame)
        vote_ids = vote_frame["id"].to_list()
        groups = None
        if spec.groups is not None:
            labels = (group_labels or {}).get(spec.groups)
            if labels is None:
                raise ValueError(f"method {method!r} needs each record's {spec.groups} label")
            groups = [labels.get(i, "") for i in vote_ids]  # records without a label form one group, ""
        chosen = consensus.select(
            vote_ids, scores, p, method=spec.aggregation, tiebreak=spec.tiebreak, coverage=spec.coverage,
            groups=groups, group_shares=spec.group_shares,
        )  # fmt: skip
        return vote_frame.filter(pl.Series(chosen.selected))["id"].to_list()
    if spec.kind == "exported":
        frame = (exported or {}).get(method)
        if frame is None:
            raise ValueError(f"method {method!r} needs the subset the {method.upper()} graph exported")
        chosen = frame.filter(pl.col("selected"))["id"]
        if len(chosen) != consensus.subset_size(frame.height, p):
            setting = "ofa.p" if method == "ofa" else "selection.p"
            raise ValueError(f"the {method} subset holds {len(chosen)} records, not floor(p N) for p = {p}: set {setting} = {p}")
        return chosen.to_list()
    raise ValueError(f"method {method!r} ({spec.kind}) has no single subset")


def stage_evaluation_subsets(
    store,
    pool_ref: PoolRef,
    vote_ref: VoteTableRef | None,
    exported_refs: dict[str, SubsetRef | OFASubsetRef | None],
    config: EvaluationConfig,
    p: float,
    benchmarks_dir: Path | None = None,
    default_image_root: Path | None = None,
    clusters_ref: PseudoLabelsRef | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> StageResult:
    """Every method's ids at ratio ``p``; ``exported_refs``: the ICONS and OFA subsets ({"icons": ref, "ofa": ref});
    ``clusters_ref``: OFA's k-means clusters, for the cluster-quota lever."""
    exported_refs = {m: ref for m, ref in exported_refs.items() if ref}
    grouped = {g for m in config.compared if (g := parse_method(m).groups)}
    clusters_ref = clusters_ref if "cluster" in grouped and clusters_ref is not None and clusters_ref.computed else None
    validation = {}
    if vote_ref and benchmarks_dir is not None:
        validation = {b: load_benchmark(benchmarks_dir, b, default_image_root, max_image_pixels=max_image_pixels) for b in vote_ref.benchmarks}
    stage = Stage(
        store,
        "evaluation_subsets",
        **image_limit_fields(max_image_pixels),
        pool=pool_ref.fingerprint,
        votes=vote_ref.fingerprint if vote_ref else None,
        exported={m: ref.fingerprint for m, ref in sorted(exported_refs.items())},
        validation={b: loaded.content_sha256 for b, loaded in validation.items()},
        clusters=clusters_ref.fingerprint if clusters_ref else None,
        **subsets_settings(config, p),
    )
    if (reused := stage.reused()) is not None:
        return reused
    ids = load_pool_manifest(store, pool_ref, columns=["id"])["id"].to_list()
    vote_frame = pl.read_parquet(store.absolute(vote_ref.path) / VOTE_TABLE_FILE) if vote_ref else None
    exported = {m: pl.read_parquet(store.absolute(ref.path) / SUBSET_PARQUET, columns=["id", "selected"]) for m, ref in exported_refs.items()}
    baseline_scores = _baseline_scores(store, pool_ref, ids, vote_ref, vote_frame, validation, default_image_root)
    group_labels = _group_labels(store, pool_ref, grouped, clusters_ref)
    rows: dict[str, list] = {"method": [], "part": [], "id": []}
    sizes = {}
    for method in config.compared:
        if method == SPECIALIST:
            if vote_frame is None:
                raise ValueError("method 'specialist' needs the ICONS vote table")
            parts = specialist_subsets(vote_frame, p)
        else:
            parts = {None: method_subset(method, ids, p, vote_frame, exported, baseline_scores, group_labels)}
        for part, chosen in parts.items():
            rows["method"] += [method] * len(chosen)
            rows["part"] += [part] * len(chosen)
            rows["id"] += chosen
        sizes[method] = len(next(iter(parts.values())))
    inputs = {
        "training_pool": pool_ref.fingerprint,
        "vote_table": vote_ref and vote_ref.fingerprint,
        **{f"{m}_subset": ref.fingerprint for m, ref in exported_refs.items()},
        **({"ofa_pseudo_labels": clusters_ref.fingerprint} if clusters_ref else {}),
    }
    frame = pl.DataFrame(rows, schema={"method": pl.String, "part": pl.String, "id": pl.String})
    metadata = {"sizes": sizes, "p": p, **subset_composition(store, pool_ref, ids, frame, vote_frame)}
    with stage.building(inputs) as out:
        frame.write_parquet(out.folder / SUBSETS_FILE)
        out.ref = {"sizes": sizes, "methods": list(config.compared)}
        out.metadata = metadata
    return stage.result()


def _group_labels(store, pool_ref: PoolRef, grouped: set[str], clusters_ref: PseudoLabelsRef | None) -> dict[str, dict[str, str]]:
    """id -> label of each grouping the compared methods use: the records' ``source`` field, OFA's cluster."""
    out: dict[str, dict[str, str]] = {}
    if "source" in grouped:
        manifest = load_pool_manifest(store, pool_ref, columns=["id", "raw_json"])
        out["source"] = {i: s or "" for i, s in zip(manifest["id"].to_list(), record_labels(manifest)["source"], strict=True)}
    if clusters_ref is not None:
        frame = pl.read_parquet(store.absolute(clusters_ref.path) / OFA_LABELS_FILE, columns=["id", "cluster"])
        out["cluster"] = {i: f"cluster-{c}" for i, c in zip(frame["id"].to_list(), frame["cluster"].to_list(), strict=True)}
    return out


def _baseline_scores(store, pool_ref, ids, vote_ref, vote_frame, validation, image_root) -> dict[str, np.ndarray]:
    """Direct-merge and text-similarity scores, in ``ids`` order (empty without a vote table)."""
    if vote_frame is None or not validation:
        return {}
    from icons_dagster.core.ofa.embedding import embedding_text

    position = {record_id: i for i, record_id in enumerate(vote_frame["id"].to_list())}
    order = np.array([position[i] for i in ids])
    sizes = {}
    for b, fp in vote_ref.influence.items():
        sizes[b] = int(store.read_manifest(store.artifact_dir("task_influence", fp, b))["metadata"]["n_validation"])
    pool_records = records_from_manifest(load_pool_manifest(store, pool_ref), image_root)
    text_of = {r.id: embedding_text(r, "conversation") for r in pool_records}
    _, text_scores = text_similarity_scores(
        [text_of[i] for i in ids], {b: [embedding_text(r, "conversation") for r in loaded.records] for b, loaded in validation.items()}
    )
    return {"direct-merge": direct_merge_scores(vote_frame, sizes)[order], "text-vote": text_scores}


def subset_composition(store, pool_ref: PoolRef, ids: list[str], frame: pl.DataFrame, vote_frame: pl.DataFrame | None) -> dict[str, Any]:
    """What each method's subset holds: overlaps between methods (Figure 5), each benchmark's
    coverage (share of its specialist top-p voters kept) and, on pools with task families,
    each family's share: the Appendix D risk that a consensus drops whole families."""
    position = {record_id: i for i, record_id in enumerate(ids)}
    masks = {}
    for (method, part), group in frame.group_by(["method", "part"], maintain_order=True):
        mask = np.zeros(len(ids), dtype=bool)
        mask[[position[i] for i in group["id"].to_list()]] = True
        masks[method if part is None else f"{method}:{part}"] = mask
    selected_methods = {m: mask for m, mask in masks.items() if m != "full"}
    names, overlap = analysis.overlap_matrix(selected_methods)
    composition: dict[str, Any] = {
        "method_overlap": {a: {b: round(float(overlap[i, j]), 3) for j, b in enumerate(names)} for i, a in enumerate(names)},
        "plots": {"method_overlap": plots.markdown_image(plots.heatmap_png(overlap, names, "overlap |A ∩ B| / |A| of method subsets"), "overlap")},
    }
    if vote_frame is not None:
        benchmarks = [c.removeprefix("vote__") for c in vote_frame.columns if c.startswith("vote__")]
        order = np.array([position[i] for i in vote_frame["id"].to_list()])
        votes = np.stack([vote_frame[f"vote__{b}"].to_numpy() for b in benchmarks], axis=1)
        composition["benchmark_coverage"] = {
            m: {b: round(v, 3) for b, v in analysis.benchmark_coverage(mask[order], votes, benchmarks).items()}
            for m, mask in selected_methods.items()
        }
    families = family_column(load_pool_manifest(store, pool_ref, columns=["id", "family"]), ids)
    if families is not None:
        composition["family_shares"] = {
            m: {f: round(v, 3) for f, v in analysis.family_shares(mask, families).items()} for m, mask in masks.items()
        }
    return composition


# -- finetuned_adapter ----------------------------------------------------------------------


def stage_finetune(
    store,
    method: str,
    pool_ref: PoolRef,
    subsets_ref: EvaluationSubsetsRef,
    model_config: ModelConfig,
    lora: LoraSettings,
    config: EvaluationConfig,
    models: ModelCache = MODELS,
    log: Log = quiet_log,
    progress=None,
    *,
    image_root: Path | None,
) -> StageResult:
    """The base model + a fresh LoRA trained on one method's subset with the shared recipe.

    A method with parts (the specialists: one subset per benchmark) gets one LoRA per part,
    each in its own folder; ``ref.adapters`` maps part (or the method) to the adapter.
    ``image_root``: the configured one, where the pool's images are now.
    """
    subsets = pl.read_parquet(store.absolute(subsets_ref.path) / SUBSETS_FILE).filter(pl.col("method") == method)
    if subsets.height == 0:
        raise ValueError(f"evaluation_subsets has no records for method {method!r} (methods: {subsets_ref.methods})")
    parts = {part or method: group["id"] for (part,), group in subsets.group_by(["part"], maintain_order=True)}
    recipes = {name: config.recipe(ids.len(), pool_ref.n_records) for name, ids in parts.items()}
    stage = Stage(
        store,
        "finetuned_adapter",
        method,
        subsets={name: fingerprint("ids", ids=ids.to_list()) for name, ids in parts.items()},
        pool=pool_ref.fingerprint,
        model=model_fingerprint_fields(model_config),
        lora=lora,
        recipes=recipes,
    )
    if (reused := stage.reused()) is not None:
        return reused
    from icons_dagster.core.model.training import train_warmup

    skips = SkipLog()
    adapters, steps, sizes = {}, {}, {}
    with stage.building({"evaluation_subsets": subsets_ref.fingerprint}) as out:
        for name, ids in parts.items():
            records = records_from_manifest(load_pool_manifest(store, pool_ref, where=pl.col("id").is_in(ids.implode())), image_root)
            folder = out.folder if name == method else out.folder / name
            log(f"{method}{'' if name == method else f'[{name}]'}: fine-tuning on {len(records)} records, {recipes[name].epochs} epoch(s)")
            with models.with_adapter(model_config, None, lora, recipes[name].seed) as peft_model:
                checkpoints = train_warmup(
                    peft_model, models.encoder(model_config), records, recipes[name], models.get(model_config)[2], folder, skips, progress
                )
            adapters[name] = str((folder / "checkpoint-0" / "adapter").relative_to(out.folder))
            steps[name], sizes[name] = checkpoints[-1].step, len(records)
        out.ref = {"method": method, "adapters": adapters, "n_records": sizes, "steps": steps}
        out.metadata = {
            "method": method,
            "n_records": sizes if len(parts) > 1 else sizes[method],
            "epochs": {name: r.epochs for name, r in recipes.items()} if len(parts) > 1 else recipes[method].epochs,
            "steps": steps if len(parts) > 1 else steps[method],
            "schedule": "equal steps" if config.equal_steps else f"{config.epochs} epoch(s) per subset",
            **skips.as_metadata(),
        }
    return stage.result()


# -- benchmark_scores -----------------------------------------------------------------------


def test_benchmarks(benchmarks_dir: Path) -> list[str]:
    """Benchmarks with a test split beside their validation split, sorted."""
    root = Path(benchmarks_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and split_file(p, "val") and split_file(p, "test"))


def stage_benchmark_scores(
    store,
    method: str,
    adapter_ref: AdapterRef,
    benchmarks_dir: Path,
    default_image_root: Path | None,
    model_config: ModelConfig,
    config: EvaluationConfig,
    models: ModelCache = MODELS,
    log: Log = quiet_log,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> StageResult:
    """Every benchmark's test split scored with the method's fine-tuned model."""
    names = test_benchmarks(benchmarks_dir)
    if not names:
        raise ValueError(f"no benchmark under {benchmarks_dir} has a test split (test.json beside val.json)")
    loaded = {name: load_benchmark(benchmarks_dir, name, default_image_root, split="test", max_image_pixels=max_image_pixels) for name in names}
    declared = {name: kind for name in names if (kind := declared_answers(Path(benchmarks_dir) / name)) is not None}
    hashes = ImageHashCache(store.image_hash_cache)
    stage = Stage(
        store,
        "benchmark_scores",
        method,
        **image_limit_fields(max_image_pixels),
        adapter=adapter_ref.fingerprint,
        tests={name: loaded[name].content_sha256 for name in names},
        test_images={name: images_key(loaded[name], hashes.contents(loaded[name].records, log)) for name in names},
        **scores_settings(config),
        **({"answers": declared} if declared else {}),  # benchmarks that declare their answer kind
    )
    if (reused := stage.reused()) is not None:
        return reused
    adapters = adapter_ref.adapters
    if method not in adapters:  # one adapter per benchmark: each scores its own benchmark only
        missing = [name for name in names if name not in adapters]
        if missing:
            raise ValueError(f"{method}: no adapter for benchmark(s) {missing}: register them so they have influence scores")
    encoder = models.encoder(model_config)
    placement = models.get(model_config)[2]
    scores = {}
    records: dict[str, dict[str, float]] = {}  # benchmark -> record id -> its score
    by_adapter: dict[str, list[str]] = {}
    for name in names:
        by_adapter.setdefault(adapters.get(method) or adapters[name], []).append(name)
    for adapter, benchmark_names in by_adapter.items():
        with models.with_adapter(model_config, store.absolute(adapter_ref.path) / adapter) as model:
            for name in benchmark_names:
                log(f"{method}: scoring {name} ({len(loaded[name].records)} test records)")
                skips = SkipLog()
                for problem in loaded[name].problems:
                    skips.add(problem.record_id or f"#{problem.index}", problem.reason)
                result = score_benchmark(
                    model, encoder, placement, name, list(loaded[name].records), skips=skips,
                    max_new_tokens=config.max_new_tokens, kind=declared.get(name),
                )
                scores[name] = {**_score_dict(result), **skips.as_metadata()}
                records[name] = result.record_scores
    with stage.building({"finetuned_adapter": adapter_ref.fingerprint}) as out:
        write_json(out.folder / SCORES_FILE, scores)
        pl.DataFrame(
            {
                "benchmark": [name for name in names for _ in records[name]],
                "id": [record for name in names for record in records[name]],
                "score": [score for name in names for score in records[name].values()],
            },
            schema={"benchmark": pl.String, "id": pl.String, "score": pl.Float64},
        ).write_parquet(out.folder / RECORD_SCORES_FILE)
        out.ref = {
            "method": method,
            "scores": {name: s["score"] for name, s in scores.items()},
            "chance": {name: s["chance"] for name, s in scores.items()},
            "n": {name: s["n"] for name, s in scores.items()},
            "collapsed": [name for name, s in scores.items() if s["collapsed"]],
        }
        out.metadata = {
            "method": method,
            "scores": {name: s["score"] for name, s in scores.items()},
            "metrics": {name: s["metric"] for name, s in scores.items()},
            "collapsed": [name for name, s in scores.items() if s["collapsed"]],
            "reference_loss": {name: s["reference_loss"] for name, s in scores.items()},
        }
    return stage.result()


def _score_dict(result) -> dict[str, Any]:
    return {
        "kind": result.kind,
        "metric": result.metric,
        "score": float(result.score),
        "n": result.n,
        "reference_loss": float(result.reference_loss),
        "collapsed": bool(result.collapsed),
        "chance": result.chance,
        "prediction_counts": result.prediction_counts,
    }


# -- evaluation_table -----------------------------------------------------------------------


def random_summary(table: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (population) std over the random-<seed> rows, per benchmark."""
    rows = [scores for method, scores in table.items() if parse_method(method).kind == "random"]
    if not rows:
        return {}, {}
    names = sorted(rows[0])
    values = np.array([[r[b] for b in names] for r in rows])
    return dict(zip(names, values.mean(axis=0).tolist(), strict=True)), dict(zip(names, values.std(axis=0).tolist(), strict=True))


def load_record_scores(store, ref: ScoresRef) -> pl.DataFrame:
    """One method's per-record test scores (benchmark, id, score)."""
    path = store.absolute(ref.path) / RECORD_SCORES_FILE
    if not path.is_file():
        raise ValueError(
            f"benchmark_scores[{ref.method}] at {ref.path} has no {RECORD_SCORES_FILE} (scored before scoring version "
            f"{SCORING_VERSION}): materialize benchmark_scores again"
        )
    return pl.read_parquet(path)


def aligned_record_scores(store, score_refs: dict[str, ScoresRef]) -> dict[str, dict[str, np.ndarray]]:
    """{name: {benchmark: per-record scores in full's record order}} for ``score_refs`` (a
    "full" among them); ValueError naming a method scored on other records."""
    per_record = {}
    for name, ref in score_refs.items():
        frame = load_record_scores(store, ref)
        per_record[name] = {b: (group["id"].to_list(), group["score"].to_numpy()) for (b,), group in frame.group_by(["benchmark"], maintain_order=True)}
    return align_record_scores(per_record, "full", sorted(score_refs["full"].scores))


def rel_intervals(
    store, score_refs: dict[str, ScoresRef], used: list[str], resamples: int
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Each method's Rel. and Rel. all difference to the random seeds' mean, with its paired
    bootstrap interval ({} and {} without random-<seed> methods; Rel.'s {} without ``used``)."""
    randoms = [m for m in score_refs if parse_method(m).kind == "random"]
    if not randoms or "full" not in score_refs:
        return {}, {}
    aligned = aligned_record_scores(store, score_refs)
    common = {"random_methods": randoms, "resamples": resamples, "seed": BOOTSTRAP_SEED}
    rel = bootstrap_rel_differences(aligned, benchmarks=used, **common) if used else {}
    return rel, bootstrap_rel_differences(aligned, **common)


def composition_by_label(store, pool_ref: PoolRef, subsets_ref: EvaluationSubsetsRef, vds_ref: VisualDependencyRef | None) -> tuple[list[dict], str]:
    """What each method's subset holds by the pool's analysis labels, against random's and the
    pool's own: each ``source`` (else ``family``) share, the share of records marked ``wrong``,
    and the mean Visual Dependency Score. Rows and a markdown table; none when the pool has
    no label and no VDS was computed. A specialist's row is the union of its per-benchmark subsets."""
    manifest = load_pool_manifest(store, pool_ref, columns=["id", "family", "raw_json"])
    labels = record_labels(manifest)
    group_name = next((name for name in ("source", "family") if any(v is not None for v in labels[name])), None)
    has_wrong = any(v is not None for v in labels["wrong"])
    if group_name is None and not has_wrong and vds_ref is None:
        return [], ""
    table = pl.DataFrame(
        {"id": manifest["id"], "group": labels[group_name] if group_name else [None] * manifest.height,
         "wrong": [bool(v) for v in labels["wrong"]]},
        schema={"id": pl.String, "group": pl.String, "wrong": pl.Boolean},
    )  # fmt: skip
    if vds_ref is not None:
        table = table.join(load_visual_dependency(store, vds_ref).select("id", pl.col("vds").cast(pl.Float64)), on="id", how="left")
    groups = sorted({g for g in table["group"].to_list() if g is not None})
    subsets = pl.read_parquet(store.absolute(subsets_ref.path) / SUBSETS_FILE).select("method", "id").unique(maintain_order=True)

    def row(method: str, chosen: pl.DataFrame) -> dict:
        counts = dict(chosen.group_by("group").len().iter_rows())
        out = {"method": method, "n": chosen.height, "wrong_share": float(chosen["wrong"].mean()) if has_wrong else None}
        out["mean_vds"] = chosen["vds"].mean() if vds_ref is not None else None
        return out | {f"share:{g}": counts.get(g, 0) / max(chosen.height, 1) for g in groups}

    rows = [row(method, table.join(part.select("id"), on="id", how="semi")) for (method,), part in subsets.group_by("method", maintain_order=True)]
    randoms = [r for r in rows if parse_method(r["method"]).kind == "random"]
    if randoms:
        rows.append({k: (f"random (mean of {len(randoms)})" if k == "method" else _mean_or_none([r[k] for r in randoms])) for k in rows[0]})
    rows.append(row("pool", table))
    headers = ["n", *(["wrong"] if has_wrong else []), *(["mean VDS"] if vds_ref is not None else []), *groups]
    keys = ["n", *(["wrong_share"] if has_wrong else []), *(["mean_vds"] if vds_ref is not None else []), *(f"share:{g}" for g in groups)]
    lines = ["| Method | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    for r in rows:
        cells = [f"{r[k]:.0f}" if k == "n" else ("–" if r[k] is None else f"{r[k]:.3f}") for k in keys]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    what = f"share of each {group_name}, " if group_name else ""
    markdown = "\n".join(lines) + (
        f"\n\nSubset composition: {what}share of records marked wrong, mean Visual Dependency Score "
        "(answer loss with a noise image minus with the record's image, at the warm-up checkpoint); "
        "the pool's own row for reference"
    )
    return rows, markdown


def _mean_or_none(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def stage_evaluation_table(
    store,
    score_refs: dict[str, ScoresRef],
    subsets_ref: EvaluationSubsetsRef,
    config: EvaluationConfig,
    pool_ref: PoolRef | None = None,
    vds_ref: VisualDependencyRef | None = None,
) -> StageResult:
    """The Rel. table, with each method's difference to random and its 95% bootstrap interval,
    and (given the pool) each subset's composition by source, wrong answers and VDS."""
    methods = list(score_refs)
    inputs = {"pool": pool_ref.fingerprint if pool_ref else None, "visual_dependency": vds_ref.fingerprint if vds_ref else None}
    stage = Stage(
        store, "evaluation_table", scores={m: score_refs[m].fingerprint for m in sorted(methods)},
        subsets=subsets_ref.fingerprint, **inputs, **table_settings(config),
    )  # fmt: skip
    if (reused := stage.reused()) is not None:
        return reused
    table = {m: dict(score_refs[m].scores) for m in methods}
    mean, std = random_summary(table)
    if mean:
        table["random (mean)"] = mean
    # Rel. over the benchmarks where the full-data model beats guessing; the paper's Rel.
    # over all of them beside it (chance levels do not depend on the model: take full's).
    used, excluded = informative_benchmarks(table["full"], score_refs["full"].chance, score_refs["full"].n)
    # no informative benchmark: Rel. is left empty rather than computed from noise
    rel = relative_scores(table, benchmarks=used) if used else {}
    rel_all = relative_scores(table)
    vs_random, vs_random_all = rel_intervals(store, score_refs, used, config.bootstrap_resamples)
    benchmarks = sorted(next(iter(table.values())))
    columns = {}
    if vs_random_all:
        columns = {
            "Δ Rel. vs random (95% CI)": {m: format_interval(d) for m, d in vs_random.items()},
            "Δ Rel. all vs random (95% CI)": {m: format_interval(d) for m, d in vs_random_all.items()},
        }
    markdown = results_markdown(table, rel, benchmarks, rel_all=rel_all, columns=columns)
    if excluded:
        markdown += (
            "\n\nRel. averages the benchmarks where the full-data model beats chance (" + (", ".join(used) or "none") + "); "
            "Rel. all is eq. 2 over every benchmark. Left out of Rel.: "
            + "; ".join(f"{name} ({why})" for name, why in excluded.items())
        )
    if columns:
        randoms = ", ".join(m for m in methods if parse_method(m).kind == "random")
        markdown += (
            f"\n\nΔ: the method's Rel. minus the mean Rel. of {randoms}, in points, with a 95% percentile interval over "
            f"{config.bootstrap_resamples} resamples of each benchmark's test records, the same records for every method; "
            "a method beats random when its interval lies above 0"
        )
    if std:
        markdown += "\n\nrandom std over seeds: " + ", ".join(f"{b} {std[b]:.3f}" for b in benchmarks)
    if SPECIALIST in table:
        markdown += "\n\nspecialist: each benchmark scored by its own model, trained on that benchmark's top-p records (Table 3)"
    collapsed = {m: score_refs[m].collapsed for m in methods if score_refs[m].collapsed}
    if collapsed:
        # a model answering (nearly) everything alike measures nothing on that benchmark
        markdown += "\n\ncollapsed predictions (one answer for >= 80% of a benchmark): " + "; ".join(
            f"{m}: {', '.join(names)}" for m, names in sorted(collapsed.items())
        )
    rows = [
        {"method": m, "benchmark": b, "score": table[m][b], "rel": rel.get(m), "rel_all": rel_all.get(m), "in_rel": b in used}
        for m in table
        for b in benchmarks
    ]
    intervals = [
        {"method": m, "measure": measure, **d, "beats_random": d["low"] > 0}
        for measure, values in (("rel", vs_random), ("rel_all", vs_random_all))
        for m, d in values.items()
    ]
    beats_random = {measure: [m for m, d in values.items() if d["low"] > 0] for measure, values in (("rel", vs_random), ("rel_all", vs_random_all))}
    composition, composition_markdown = composition_by_label(store, pool_ref, subsets_ref, vds_ref) if pool_ref else ([], "")
    if composition_markdown:
        markdown += "\n\n" + composition_markdown
    with stage.building({"benchmark_scores": {m: score_refs[m].fingerprint for m in methods}, **inputs}) as out:
        pl.DataFrame(rows).write_parquet(out.folder / TABLE_FILE)
        if composition:
            pl.DataFrame(composition).write_parquet(out.folder / COMPOSITION_FILE)
        pl.DataFrame(intervals, schema=INTERVALS_SCHEMA).write_parquet(out.folder / INTERVALS_FILE)
        (out.folder / TABLE_MARKDOWN).write_text(markdown + "\n", encoding="utf-8")
        out.ref = {
            "rel": rel,
            "rel_all": rel_all,
            "rel_benchmarks": used,
            "methods": list(table),
            "rel_vs_random": vs_random,
            "rel_all_vs_random": vs_random_all,
        }
        out.metadata = {
            "table": markdown,
            "rel": rel,
            "rel_all": rel_all,
            "rel_benchmarks": used,
            "excluded_from_rel": excluded,
            "subset_sizes": subsets_ref.sizes,
            "collapsed": collapsed,
            "rel_vs_random": vs_random,
            "rel_all_vs_random": vs_random_all,
            "beats_random": beats_random,  # the methods whose interval lies above 0, by Rel. and by Rel. all
            "bootstrap_resamples": config.bootstrap_resamples,
            "composition": composition,
        }
    return stage.result()
