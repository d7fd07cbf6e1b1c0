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
from icons_dagster.core.config import LoraSettings, ModelConfig, WarmupConfig, setting
from icons_dagster.core.evaluation import informative_benchmarks, relative_scores, results_markdown, score_benchmark
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
# Bump when scoring changes what a benchmark_scores artifact holds (2: chance levels).
SCORING_VERSION = 2
# icons: the subset the ICONS graph exported (the selection as configured: by default the
# vote with coverage 0.5). icons-paper: the paper's rule exactly (vote, mean-rank tie-break,
# no coverage reserve); Table 6's aggregations with the same rule.
EXPORTED = ("icons", "ofa")  # subsets an upstream selector wrote; the evaluation reads them
ICONS_METHODS = {"icons-paper": "vote", "icons-mean": "mean", "icons-max": "max", "icons-rank": "rank", "icons-norm": "norm"}
# The vote with the other tie-break at the cutoff (best single-benchmark percentile rank).
MAX_RANK_METHOD = "icons-maxrank"
# icons-cover-<percent>: the vote with that share of the subset reserved for each
# benchmark's own top records (consensus ``coverage``), the Appendix D remedy.
COVER_PREFIX = "icons-cover-"
# direct-merge: Table 7 (one merged validation set); text-vote: the same vote over TF-IDF
# similarity to each validation set, to learn what gradients add beyond surface text.
BASELINES = ("direct-merge", "text-vote")
# Table 3: one model per benchmark, trained on that benchmark's own top-p records and
# scored on that benchmark only (one row, the diagonal of the specialists' matrix).
SPECIALIST = "specialist"
DEFAULT_METHODS = (
    "full", "random-0", "random-1", "random-2", "icons", *ICONS_METHODS, MAX_RANK_METHOD,
    f"{COVER_PREFIX}25", f"{COVER_PREFIX}50", f"{COVER_PREFIX}100",
    *BASELINES, "ofa", SPECIALIST,
)


@dataclass(frozen=True)
class EvaluationConfig:
    """Which methods are compared and the one fine-tuning recipe they all get.

    The subsets are cut at the selection's ``p`` (selection.p; OFA's ``p`` must match).
    """

    methods: tuple[str, ...] = setting((), "methods to compare (comma-separated); empty or 'all': every evaluation partition", aliases=("--methods",))
    learning_rate: float = setting(2e-4, "fine-tune learning rate", aliases=("--learning-rate",))
    epochs: int = setting(1, "fine-tune epochs over each subset", aliases=("--epochs",))
    batch_size: int = setting(4, "fine-tune batch size", aliases=("--batch-size",))
    seed: int = setting(0, "fine-tune seed", aliases=("--seed",))
    max_new_tokens: int = setting(64, "tokens generated per test answer")
    # False: the paper's recipe, ``epochs`` over each subset. True: every subset is trained
    # for about as many steps as the full data gets (epochs x N / |subset|, rounded).
    equal_steps: bool = setting(False, "train every subset about as many steps as the full data", aliases=("--equal-steps",))
    lora_r: int = setting(0, "the fine-tune's LoRA rank; 0 = the warm-up's LoRA")
    lora_alpha: int = setting(0, "the fine-tune's LoRA alpha; 0 = twice its rank")

    def __post_init__(self) -> None:
        if isinstance(self.methods, (list, str)):
            object.__setattr__(self, "methods", tuple([self.methods] if isinstance(self.methods, str) else self.methods))
        if self.methods == ("all",):
            object.__setattr__(self, "methods", ())
        for method in self.methods:
            known = method in (*EXPORTED, *ICONS_METHODS, MAX_RANK_METHOD, *BASELINES, "full", SPECIALIST)
            if not known and _random_seed(method) is None and _coverage(method) is None:
                raise ValueError(
                    f"unknown evaluation method {method!r}: full, random-<seed>, icons, {', '.join(ICONS_METHODS)}, "
                    f"{MAX_RANK_METHOD}, {COVER_PREFIX}<percent>, {', '.join(BASELINES)}, ofa, {SPECIALIST}"
                )
        if self.methods and "full" not in self.methods:
            raise ValueError("the evaluation needs the 'full' method: Rel. divides by the full-data score")

    @property
    def compared(self) -> tuple[str, ...]:
        """The methods compared: the configured ones, or every default method."""
        return self.methods or DEFAULT_METHODS

    def partition_methods(self) -> tuple[str, ...]:
        """The compared methods in the evaluation partitions' order; each must be a partition."""
        unknown = [m for m in self.compared if m not in DEFAULT_METHODS]
        if unknown:
            raise ValueError(f"evaluation.methods {unknown} are not evaluation partitions; choose from {list(DEFAULT_METHODS)}")
        return tuple(m for m in DEFAULT_METHODS if m in self.compared)

    def lora_for(self, model_lora: LoraSettings) -> LoraSettings:
        """The LoRA every method's fine-tune gets (the selection's own LoRA unless set here)."""
        if not self.lora_r:
            return model_lora
        return LoraSettings(self.lora_r, self.lora_alpha or 2 * self.lora_r, model_lora.dropout, model_lora.target_modules)

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


def _coverage(method: str) -> float | None:
    """icons-cover-<percent> -> percent / 100 (1..100), else None."""
    rest = method.removeprefix(COVER_PREFIX)
    if method.startswith(COVER_PREFIX) and rest.isdigit() and 1 <= int(rest) <= 100:
        return int(rest) / 100
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
) -> list[str]:
    """The ids one method trains on (``ids`` is the pool in manifest order).

    ``exported``: the subset frames (id, selected) the ICONS and OFA graphs wrote.
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
    if method in ICONS_METHODS or method == MAX_RANK_METHOD or _coverage(method) is not None:
        if vote_frame is None:
            raise ValueError(f"method {method!r} needs the ICONS vote table")
        benchmarks, scores = _influence_columns(vote_frame)
        chosen = consensus.select(
            vote_frame["id"].to_list(),
            scores,
            p,
            method=ICONS_METHODS.get(method, "vote"),
            tiebreak="max-rank" if method == MAX_RANK_METHOD else "mean-rank",
            coverage=_coverage(method) or 0.0,
        )
        return vote_frame.filter(pl.Series(chosen.selected))["id"].to_list()
    if method in EXPORTED:
        frame = (exported or {}).get(method)
        if frame is None:
            raise ValueError(f"method {method!r} needs the subset the {method.upper()} graph exported")
        chosen = frame.filter(pl.col("selected"))["id"]
        if len(chosen) != consensus.subset_size(frame.height, p):
            setting = "ofa.p" if method == "ofa" else "settings.p"
            raise ValueError(f"the {method} subset holds {len(chosen)} records, not floor(p N) for p = {p}: set {setting} = {p}")
        return chosen.to_list()
    raise ValueError(f"unknown method {method!r}")


def stage_evaluation_subsets(
    store,
    pool_ref: dict,
    vote_ref: dict | None,
    exported_refs: dict[str, dict | None],
    config: EvaluationConfig,
    p: float,
    benchmarks_dir: Path | None = None,
    default_image_root: Path | None = None,
) -> StageResult:
    """Every method's ids at ratio ``p``; ``exported_refs``: the ICONS and OFA subsets ({"icons": ref, "ofa": ref})."""
    exported_refs = {m: ref for m, ref in exported_refs.items() if ref}
    validation = {}
    if vote_ref and benchmarks_dir is not None:
        validation = {b: load_benchmark(benchmarks_dir, b, default_image_root) for b in vote_ref["benchmarks"]}
    fp = fingerprint(
        "evaluation_subsets",
        pool=pool_ref["fingerprint"],
        votes=vote_ref["fingerprint"] if vote_ref else None,
        exported={m: ref["fingerprint"] for m, ref in sorted(exported_refs.items())},
        validation={b: loaded.content_sha256 for b, loaded in validation.items()},
        methods=list(config.compared),
        p=p,
    )
    directory = store.artifact_dir("evaluation_subsets", fp)
    if (reused := reuse_artifact(store, "evaluation_subsets", fp, directory)) is not None:
        return reused
    ids = load_pool_manifest(store, pool_ref, columns=["id"])["id"].to_list()
    vote_frame = pl.read_parquet(store.absolute(vote_ref["path"]) / VOTE_TABLE_FILE) if vote_ref else None
    exported = {m: pl.read_parquet(store.absolute(ref["path"]) / SUBSET_PARQUET, columns=["id", "selected"]) for m, ref in exported_refs.items()}
    baseline_scores = _baseline_scores(store, pool_ref, ids, vote_ref, vote_frame, validation)
    rows: dict[str, list] = {"method": [], "part": [], "id": []}
    sizes = {}
    for method in config.compared:
        if method == SPECIALIST:
            if vote_frame is None:
                raise ValueError("method 'specialist' needs the ICONS vote table")
            parts = specialist_subsets(vote_frame, p)
        else:
            parts = {None: method_subset(method, ids, p, vote_frame, exported, baseline_scores)}
        for part, chosen in parts.items():
            rows["method"] += [method] * len(chosen)
            rows["part"] += [part] * len(chosen)
            rows["id"] += chosen
        sizes[method] = len(next(iter(parts.values())))
    inputs = {
        "training_pool": pool_ref["fingerprint"],
        "vote_table": vote_ref and vote_ref["fingerprint"],
        **{f"{m}_subset": ref["fingerprint"] for m, ref in exported_refs.items()},
    }
    frame = pl.DataFrame(rows, schema={"method": pl.String, "part": pl.String, "id": pl.String})
    metadata = {"sizes": sizes, "p": p, **subset_composition(store, pool_ref, ids, frame, vote_frame)}
    with building_artifact(store, directory, "evaluation_subsets", fp, inputs) as (tmp, manifest):
        frame.write_parquet(tmp / SUBSETS_FILE)
        manifest["ref"] = {"sizes": sizes, "methods": list(config.compared)}
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
    pool_ref: dict,
    subsets_ref: dict,
    model_config: ModelConfig,
    lora: LoraSettings,
    config: EvaluationConfig,
    models: ModelCache = MODELS,
    log: Log = quiet_log,
    progress=None,
) -> StageResult:
    """The base model + a fresh LoRA trained on one method's subset with the shared recipe.

    A method with parts (the specialists: one subset per benchmark) gets one LoRA per part,
    each in its own folder; ``ref["adapters"]`` maps part (or the method) to the adapter.
    """
    subsets = pl.read_parquet(store.absolute(subsets_ref["path"]) / SUBSETS_FILE).filter(pl.col("method") == method)
    if subsets.height == 0:
        raise ValueError(f"evaluation_subsets has no records for method {method!r} (methods: {subsets_ref.get('methods')})")
    parts = {part or method: group["id"] for (part,), group in subsets.group_by(["part"], maintain_order=True)}
    recipes = {name: config.recipe(ids.len(), pool_ref["n_records"]) for name, ids in parts.items()}
    fp = fingerprint(
        "finetuned_adapter",
        subsets={name: fingerprint("ids", ids=ids.to_list()) for name, ids in parts.items()},
        pool=pool_ref["fingerprint"],
        model=model_fingerprint_fields(model_config),
        lora=lora,
        recipes=recipes,
    )
    directory = store.artifact_dir("finetuned_adapter", fp, method)
    if (reused := reuse_artifact(store, "finetuned_adapter", fp, directory)) is not None:
        return reused
    from icons_dagster.core.warmup import train_warmup

    skips = SkipLog()
    adapters, steps, sizes = {}, {}, {}
    with building_artifact(store, directory, "finetuned_adapter", fp, {"evaluation_subsets": subsets_ref["fingerprint"]}) as (tmp, manifest):
        for name, ids in parts.items():
            records = records_from_manifest(load_pool_manifest(store, pool_ref, where=pl.col("id").is_in(ids.implode())))
            out = tmp if name == method else tmp / name
            log(f"{method}{'' if name == method else f'[{name}]'}: fine-tuning on {len(records)} records, {recipes[name].epochs} epoch(s)")
            with models.with_adapter(model_config, None, lora, recipes[name].seed) as peft_model:
                checkpoints = train_warmup(
                    peft_model, models.encoder(model_config), records, recipes[name], models.get(model_config)[2], out, skips, progress
                )
            adapters[name] = str((out / "checkpoint-0" / "adapter").relative_to(tmp))
            steps[name], sizes[name] = checkpoints[-1].step, len(records)
        manifest["ref"] = {"method": method, "adapters": adapters, "n_records": sizes, "steps": steps}
        manifest["metadata"] = {
            "method": method,
            "n_records": sizes if len(parts) > 1 else sizes[method],
            "epochs": {name: r.epochs for name, r in recipes.items()} if len(parts) > 1 else recipes[method].epochs,
            "steps": steps if len(parts) > 1 else steps[method],
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
        scoring_version=SCORING_VERSION,
    )
    directory = store.artifact_dir("benchmark_scores", fp, method)
    if (reused := reuse_artifact(store, "benchmark_scores", fp, directory)) is not None:
        return reused
    adapters = adapter_ref["adapters"]
    if method not in adapters:  # one adapter per benchmark: each scores its own benchmark only
        missing = [name for name in names if name not in adapters]
        if missing:
            raise ValueError(f"{method}: no adapter for benchmark(s) {missing}: register them so they have influence scores")
    encoder = models.encoder(model_config)
    placement = models.get(model_config)[2]
    scores = {}
    by_adapter: dict[str, list[str]] = {}
    for name in names:
        by_adapter.setdefault(adapters.get(method) or adapters[name], []).append(name)
    for adapter, benchmark_names in by_adapter.items():
        with models.with_adapter(model_config, store.absolute(adapter_ref["path"]) / adapter) as model:
            for name in benchmark_names:
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
            "chance": {name: s["chance"] for name, s in scores.items()},
            "n": {name: s["n"] for name, s in scores.items()},
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
        "chance": result.chance,
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
    # Rel. over the benchmarks where the full-data model beats guessing; the paper's Rel.
    # over all of them beside it (chance levels do not depend on the model: take full's).
    used, excluded = informative_benchmarks(table["full"], score_refs["full"]["chance"], score_refs["full"]["n"])
    # no informative benchmark: Rel. is left empty rather than computed from noise
    rel = relative_scores(table, benchmarks=used) if used else {}
    rel_all = relative_scores(table)
    benchmarks = sorted(next(iter(table.values())))
    markdown = results_markdown(table, rel, benchmarks, rel_all=rel_all)
    if excluded:
        markdown += (
            "\n\nRel. averages the benchmarks where the full-data model beats chance (" + (", ".join(used) or "none") + "); "
            "Rel. all is eq. 2 over every benchmark. Left out of Rel.: "
            + "; ".join(f"{name} ({why})" for name, why in excluded.items())
        )
    if std:
        markdown += "\n\nrandom std over seeds: " + ", ".join(f"{b} {std[b]:.3f}" for b in benchmarks)
    if SPECIALIST in table:
        markdown += "\n\nspecialist: each benchmark scored by its own model, trained on that benchmark's top-p records (Table 3)"
    collapsed = {m: score_refs[m].get("collapsed", []) for m in methods if score_refs[m].get("collapsed")}
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
    with building_artifact(store, directory, "evaluation_table", fp, {"benchmark_scores": {m: score_refs[m]["fingerprint"] for m in methods}}) as (tmp, manifest):
        pl.DataFrame(rows).write_parquet(tmp / TABLE_FILE)
        (tmp / TABLE_MARKDOWN).write_text(markdown + "\n", encoding="utf-8")
        manifest["ref"] = {"rel": rel, "rel_all": rel_all, "rel_benchmarks": used, "methods": list(table)}
        manifest["metadata"] = {
            "table": markdown,
            "rel": rel,
            "rel_all": rel_all,
            "rel_benchmarks": used,
            "excluded_from_rel": excluded,
            "subset_sizes": subsets_ref.get("sizes", {}),
            "collapsed": collapsed,
        }
    return reuse_artifact(store, "evaluation_table", fp, directory, built=True)

