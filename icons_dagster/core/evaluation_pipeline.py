"""The evaluation stages: each method's subset, a fine-tune on it, every benchmark scored, one table.

A selector is only as good as the model trained on what it selects. For every method the
same base model gets the same LoRA recipe (the warm-up trainer: AdamW, cosine, one epoch by
default) on the method's subset; then every benchmark's test split is scored with the
metric that fits its answers (``core/evaluation.py``), and the table gives Rel. (paper
eq. 2: mean over benchmarks of score / full-data score).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from icons_dagster.core import analysis, consensus, plots
from icons_dagster.core.benchmarks import load_benchmark
from icons_dagster.core.config import LoraSettings, ModelConfig, WarmupConfig
from icons_dagster.core.evaluation import relative_scores, results_markdown, score_benchmark
from icons_dagster.core.fingerprint import fingerprint
from icons_dagster.core.pipeline import (
    MODELS,
    SUBSET_PARQUET,
    VOTE_TABLE_FILE,
    ModelCache,
    StageResult,
    building_artifact,
    family_column,
    load_pool_manifest,
    model_fingerprint_fields,
    quiet_log,
    reuse_artifact,
)
from icons_dagster.core.pool import records_from_manifest
from icons_dagster.core.records import split_file
from icons_dagster.core.samples import SkipLog
from icons_dagster.core.store import write_json

Log = Callable[[str], None]

SUBSETS_FILE = "subsets.parquet"
SCORES_FILE = "scores.json"
TABLE_FILE = "evaluation_table.parquet"
TABLE_MARKDOWN = "evaluation_table.md"
# Table 6's aggregations, each selected from the same vote table with the same tie-break.
ICONS_METHODS = {"icons": "vote", "icons-mean": "mean", "icons-max": "max", "icons-rank": "rank", "icons-norm": "norm"}
# direct-merge: Table 7 (one merged validation set); text-vote: the same vote over TF-IDF
# similarity to each validation set, to learn what gradients add beyond surface text.
BASELINES = ("direct-merge", "text-vote")
DEFAULT_METHODS = ("full", "random-0", "random-1", "random-2", *ICONS_METHODS, *BASELINES, "ofa")


@dataclass(frozen=True)
class EvaluationConfig:
    """Which methods are compared and the one fine-tuning recipe they all get."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    p: float = 0.2
    learning_rate: float = 2e-4
    epochs: int = 1
    batch_size: int = 4
    seed: int = 0
    max_new_tokens: int = 64
    # False: the paper's recipe, ``epochs`` over each subset. True: every subset is trained
    # for about as many steps as the full data gets (epochs x N / |subset|, rounded).
    equal_steps: bool = False

    def __post_init__(self) -> None:
        for method in self.methods:
            if method not in (*ICONS_METHODS, *BASELINES, "full", "ofa") and _random_seed(method) is None:
                raise ValueError(f"unknown evaluation method {method!r}: full, random-<seed>, {', '.join((*ICONS_METHODS, *BASELINES))}, ofa")
        if "full" not in self.methods:
            raise ValueError("the evaluation needs the 'full' method: Rel. divides by the full-data score")

    def recipe(self, n_subset: int, n_pool: int) -> WarmupConfig:
        """The fine-tune recipe (the warm-up trainer on a whole subset: ratio 1, one checkpoint)."""
        epochs = max(self.epochs, round(self.epochs * n_pool / max(1, n_subset))) if self.equal_steps else self.epochs
        return WarmupConfig(
            ratio=1.0, seed=self.seed, learning_rate=self.learning_rate, epochs=epochs, num_checkpoints=1, batch_size=self.batch_size
        )


def _random_seed(method: str) -> int | None:
    if method.startswith("random-") and method[len("random-") :].isdigit():
        return int(method[len("random-") :])
    return None


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


def method_subset(
    method: str,
    ids: list[str],
    p: float,
    vote_frame: pl.DataFrame | None,
    ofa_frame: pl.DataFrame | None,
    baseline_scores: dict[str, np.ndarray] | None = None,
) -> list[str]:
    """The ids one method trains on (``ids`` is the pool in manifest order).

    ``baseline_scores``: "direct-merge" [N] and "text-vote" [N, K] scores in ``ids`` order.
    """
    if method in BASELINES:
        if not baseline_scores or method not in baseline_scores:
            raise ValueError(f"method {method!r} needs its scores (the vote table and the benchmarks' validation sets)")
        scores = baseline_scores[method]
        chosen = consensus.select(ids, scores.reshape(len(ids), -1), p, method="vote" if method == "text-vote" else "mean")
        return [ids[i] for i in np.flatnonzero(chosen.selected)]
    if method == "full":
        return list(ids)
    seed = _random_seed(method)
    if seed is not None:
        rng = np.random.Generator(np.random.PCG64(seed))
        chosen = np.sort(rng.choice(len(ids), size=consensus.subset_size(len(ids), p), replace=False))
        return [ids[i] for i in chosen]
    if method in ICONS_METHODS:
        if vote_frame is None:
            raise ValueError(f"method {method!r} needs the ICONS vote table")
        benchmarks = [c.removeprefix("influence__") for c in vote_frame.columns if c.startswith("influence__")]
        scores = np.stack([vote_frame[f"influence__{b}"].to_numpy() for b in benchmarks], axis=1)
        chosen = consensus.select(vote_frame["id"].to_list(), scores, p, method=ICONS_METHODS[method])
        return vote_frame.filter(pl.Series(chosen.selected))["id"].to_list()
    if method == "ofa":
        if ofa_frame is None:
            raise ValueError("method 'ofa' needs the OFA subset")
        chosen = ofa_frame.filter(pl.col("selected"))["id"]
        if len(chosen) != consensus.subset_size(ofa_frame.height, p):
            raise ValueError(f"the OFA subset holds {len(chosen)} records, not floor(p N) for p = {p}: set ofa.p = {p}")
        return chosen.to_list()
    raise ValueError(f"unknown method {method!r}")


def stage_evaluation_subsets(
    store,
    pool_ref: dict,
    vote_ref: dict | None,
    ofa_ref: dict | None,
    config: EvaluationConfig,
    benchmarks_dir: Path | None = None,
    default_image_root: Path | None = None,
) -> StageResult:
    validation = {}
    if vote_ref and benchmarks_dir is not None:
        validation = {b: load_benchmark(benchmarks_dir, b, default_image_root) for b in vote_ref["benchmarks"]}
    fp = fingerprint(
        "evaluation_subsets",
        pool=pool_ref["fingerprint"],
        votes=vote_ref["fingerprint"] if vote_ref else None,
        ofa=ofa_ref["fingerprint"] if ofa_ref else None,
        validation={b: loaded.content_sha256 for b, loaded in validation.items()},
        methods=list(config.methods),
        p=config.p,
    )
    directory = store.artifact_dir("evaluation_subsets", fp)
    if (reused := reuse_artifact(store, "evaluation_subsets", fp, directory)) is not None:
        return reused
    ids = load_pool_manifest(store, pool_ref, columns=["id"])["id"].to_list()
    vote_frame = pl.read_parquet(store.absolute(vote_ref["path"]) / VOTE_TABLE_FILE) if vote_ref else None
    ofa_frame = pl.read_parquet(store.absolute(ofa_ref["path"]) / SUBSET_PARQUET) if ofa_ref else None
    baseline_scores = _baseline_scores(store, pool_ref, ids, vote_ref, vote_frame, validation)
    rows: dict[str, list] = {"method": [], "id": []}
    sizes = {}
    for method in config.methods:
        chosen = method_subset(method, ids, config.p, vote_frame, ofa_frame, baseline_scores)
        rows["method"] += [method] * len(chosen)
        rows["id"] += chosen
        sizes[method] = len(chosen)
    inputs = {"training_pool": pool_ref["fingerprint"], "vote_table": vote_ref and vote_ref["fingerprint"], "ofa_selected_subset": ofa_ref and ofa_ref["fingerprint"]}
    frame = pl.DataFrame(rows, schema={"method": pl.String, "id": pl.String})
    metadata = {"sizes": sizes, "p": config.p, **subset_composition(store, pool_ref, ids, frame, vote_frame)}
    with building_artifact(store, directory, "evaluation_subsets", fp, inputs) as (tmp, manifest):
        frame.write_parquet(tmp / SUBSETS_FILE)
        manifest["ref"] = {"sizes": sizes, "methods": list(config.methods)}
        manifest["metadata"] = metadata
    return reuse_artifact(store, "evaluation_subsets", fp, directory, built=True)


def _baseline_scores(store, pool_ref, ids, vote_ref, vote_frame, validation) -> dict[str, np.ndarray]:
    """Direct-merge and text-similarity scores, in ``ids`` order (empty without a vote table)."""
    if vote_frame is None or not validation:
        return {}
    from icons_dagster.core.embedding import embedding_text

    position = {record_id: i for i, record_id in enumerate(vote_frame["id"].to_list())}
    order = np.array([position[i] for i in ids])
    sizes = {}
    for b, fp in vote_ref["influence"].items():
        sizes[b] = int(store.read_manifest(store.artifact_dir("task_influence", fp, b))["metadata"]["n_validation"])
    pool_records = records_from_manifest(load_pool_manifest(store, pool_ref))
    text_of = {r.id: embedding_text(r, "conversation") for r in pool_records}
    _, text_scores = text_similarity_scores(
        [text_of[i] for i in ids], {b: [embedding_text(r, "conversation") for r in loaded.records] for b, loaded in validation.items()}
    )
    return {"direct-merge": direct_merge_scores(vote_frame, sizes)[order], "text-vote": text_scores}


def subset_composition(store, pool_ref: dict, ids: list[str], frame: pl.DataFrame, vote_frame: pl.DataFrame | None) -> dict[str, Any]:
    """What each method's subset holds: overlaps between methods (Figure 5), each benchmark's
    coverage (share of its specialist top-p voters kept) and, on pools with task families,
    each family's share: the Appendix D risk that a consensus drops whole families."""
    position = {record_id: i for i, record_id in enumerate(ids)}
    masks = {}
    for method in frame["method"].unique(maintain_order=True).to_list():
        mask = np.zeros(len(ids), dtype=bool)
        mask[[position[i] for i in frame.filter(pl.col("method") == method)["id"].to_list()]] = True
        masks[method] = mask
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
    pool_ref: dict,
    subsets_ref: dict,
    model_config: ModelConfig,
    lora: LoraSettings,
    config: EvaluationConfig,
    models: ModelCache = MODELS,
    log: Log = quiet_log,
    progress=None,
) -> StageResult:
    """The base model + a fresh LoRA trained on one method's subset with the shared recipe."""
    subset = pl.read_parquet(store.absolute(subsets_ref["path"]) / SUBSETS_FILE).filter(pl.col("method") == method)["id"]
    if subset.len() == 0:
        raise ValueError(f"evaluation_subsets has no records for method {method!r} (methods: {subsets_ref.get('methods')})")
    recipe = config.recipe(subset.len(), pool_ref["n_records"])
    fp = fingerprint(
        "finetuned_adapter",
        subset=fingerprint("ids", ids=subset.to_list()),
        pool=pool_ref["fingerprint"],
        model=model_fingerprint_fields(model_config),
        lora=lora,
        recipe=recipe,
    )
    directory = store.artifact_dir("finetuned_adapter", fp, method)
    if (reused := reuse_artifact(store, "finetuned_adapter", fp, directory)) is not None:
        return reused
    from icons_dagster.core.warmup import train_warmup

    records = records_from_manifest(load_pool_manifest(store, pool_ref, where=pl.col("id").is_in(subset.implode())))
    log(f"{method}: fine-tuning on {len(records)} records, {recipe.epochs} epoch(s)")
    skips = SkipLog()
    with building_artifact(store, directory, "finetuned_adapter", fp, {"evaluation_subsets": subsets_ref["fingerprint"]}) as (tmp, manifest):
        with models.with_adapter(model_config, None, lora, recipe.seed) as peft_model:
            checkpoints = train_warmup(peft_model, models.encoder(model_config), records, recipe, models.get(model_config)[2], tmp, skips, progress)
        manifest["ref"] = {"method": method, "adapter": "checkpoint-0/adapter", "n_records": len(records), "steps": checkpoints[-1].step}
        manifest["metadata"] = {
            "method": method,
            "n_records": len(records),
            "epochs": recipe.epochs,
            "steps": checkpoints[-1].step,
            "schedule": "equal steps" if config.equal_steps else f"{config.epochs} epoch(s) per subset",
            **skips.as_metadata(),
        }
    return reuse_artifact(store, "finetuned_adapter", fp, directory, built=True)


# -- benchmark_scores -----------------------------------------------------------------------


def test_benchmarks(benchmarks_dir: Path) -> list[str]:
    """Benchmarks with a test split beside their validation split, sorted."""
    root = Path(benchmarks_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and split_file(p, "val") and split_file(p, "test"))


def stage_benchmark_scores(
    store,
    method: str,
    adapter_ref: dict,
    benchmarks_dir: Path,
    default_image_root: Path | None,
    model_config: ModelConfig,
    config: EvaluationConfig,
    models: ModelCache = MODELS,
    log: Log = quiet_log,
) -> StageResult:
    """Every benchmark's test split scored with the method's fine-tuned model."""
    names = test_benchmarks(benchmarks_dir)
    if not names:
        raise ValueError(f"no benchmark under {benchmarks_dir} has a test split (test.json beside val.json)")
    loaded = {name: load_benchmark(benchmarks_dir, name, default_image_root, split="test") for name in names}
    fp = fingerprint(
        "benchmark_scores",
        adapter=adapter_ref["fingerprint"],
        tests={name: loaded[name].content_sha256 for name in names},
        max_new_tokens=config.max_new_tokens,
    )
    directory = store.artifact_dir("benchmark_scores", fp, method)
    if (reused := reuse_artifact(store, "benchmark_scores", fp, directory)) is not None:
        return reused
    adapter_dir = store.absolute(adapter_ref["path"]) / adapter_ref["adapter"]
    encoder = models.encoder(model_config)
    placement = models.get(model_config)[2]
    scores = {}
    with models.with_adapter(model_config, adapter_dir) as model:
        for name in names:
            log(f"{method}: scoring {name} ({len(loaded[name].records)} test records)")
            skips = SkipLog()
            for problem in loaded[name].problems:
                skips.add(problem.record_id or f"#{problem.index}", problem.reason)
            result = score_benchmark(model, encoder, placement, name, list(loaded[name].records), skips=skips, max_new_tokens=config.max_new_tokens)
            scores[name] = {**_score_dict(result), **skips.as_metadata()}
    with building_artifact(store, directory, "benchmark_scores", fp, {"finetuned_adapter": adapter_ref["fingerprint"]}) as (tmp, manifest):
        write_json(tmp / SCORES_FILE, scores)
        manifest["ref"] = {
            "method": method,
            "scores": {name: s["score"] for name, s in scores.items()},
            "collapsed": [name for name, s in scores.items() if s["collapsed"]],
        }
        manifest["metadata"] = {
            "method": method,
            "scores": {name: s["score"] for name, s in scores.items()},
            "metrics": {name: s["metric"] for name, s in scores.items()},
            "collapsed": [name for name, s in scores.items() if s["collapsed"]],
            "reference_loss": {name: s["reference_loss"] for name, s in scores.items()},
        }
    return reuse_artifact(store, "benchmark_scores", fp, directory, built=True)


def _score_dict(result) -> dict[str, Any]:
    return {
        "kind": result.kind,
        "metric": result.metric,
        "score": float(result.score),
        "n": result.n,
        "reference_loss": float(result.reference_loss),
        "collapsed": bool(result.collapsed),
        "prediction_counts": result.prediction_counts,
    }


# -- evaluation_table -----------------------------------------------------------------------


def random_summary(table: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (population) std over the random-<seed> rows, per benchmark."""
    rows = [scores for method, scores in table.items() if _random_seed(method) is not None]
    if not rows:
        return {}, {}
    names = sorted(rows[0])
    values = np.array([[r[b] for b in names] for r in rows])
    return dict(zip(names, values.mean(axis=0).tolist(), strict=True)), dict(zip(names, values.std(axis=0).tolist(), strict=True))


def stage_evaluation_table(store, score_refs: dict[str, dict], subsets_ref: dict) -> StageResult:
    methods = list(score_refs)
    fp = fingerprint("evaluation_table", scores={m: score_refs[m]["fingerprint"] for m in sorted(methods)})
    directory = store.artifact_dir("evaluation_table", fp)
    if (reused := reuse_artifact(store, "evaluation_table", fp, directory)) is not None:
        return reused
    table = {m: dict(score_refs[m]["scores"]) for m in methods}
    mean, std = random_summary(table)
    if mean:
        table["random (mean)"] = mean
    rel = relative_scores(table)
    benchmarks = sorted(next(iter(table.values())))
    markdown = results_markdown(table, rel, benchmarks)
    if std:
        markdown += "\n\nrandom std over seeds: " + ", ".join(f"{b} {std[b]:.3f}" for b in benchmarks)
    collapsed = {m: score_refs[m].get("collapsed", []) for m in methods if score_refs[m].get("collapsed")}
    if collapsed:
        # a model answering (nearly) everything alike measures nothing on that benchmark
        markdown += "\n\ncollapsed predictions (one answer for >= 80% of a benchmark): " + "; ".join(
            f"{m}: {', '.join(names)}" for m, names in sorted(collapsed.items())
        )
    rows = [{"method": m, "benchmark": b, "score": table[m][b], "rel": rel.get(m)} for m in table for b in benchmarks]
    with building_artifact(store, directory, "evaluation_table", fp, {"benchmark_scores": {m: score_refs[m]["fingerprint"] for m in methods}}) as (tmp, manifest):
        pl.DataFrame(rows).write_parquet(tmp / TABLE_FILE)
        (tmp / TABLE_MARKDOWN).write_text(markdown + "\n", encoding="utf-8")
        manifest["ref"] = {"rel": rel, "methods": list(table)}
        manifest["metadata"] = {"table": markdown, "rel": rel, "subset_sizes": subsets_ref.get("sizes", {}), "collapsed": collapsed}
    return reuse_artifact(store, "evaluation_table", fp, directory, built=True)

