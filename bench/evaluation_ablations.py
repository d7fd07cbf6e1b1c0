"""The paper's analyses on the demo, each scored by fine-tuning on what it selects.

- selection ratio p = 5/10/20/40/60% (Figure 4): full, random (3 seeds), ICONS vote and the
  coverage-aware votes at each p;
- projection dimension 1024/2560/5120/10240 (Appendix A), warm-up ratio 5/10/20/100%, and
  3 seeds of the whole pipeline (warm-up subset and projection; Appendix B.1): the ICONS
  run is redone under each setting, its vote and coverage-aware subsets are fine-tuned and
  scored, and each subset's overlap with the default run's is reported.

Everything runs in one home (the pool, the stage-1 model, the full and random fine-tunes
are computed once and reused); the ICONS graph runs through Dagster, the fine-tunes and
scores call the same stage functions the evaluation assets call.

Usage: python bench/evaluation_ablations.py [--home DIR] [--threads 2] [--only ratio,dim,warmup,seed]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

import polars as pl  # noqa: E402

from icons_dagster.core.evaluation.metrics import informative_benchmarks, relative_scores  # noqa: E402
from icons_dagster.core.stages.evaluation import (  # noqa: E402
    SUBSETS_FILE,
    stage_benchmark_scores,
    stage_evaluation_subsets,
    stage_finetune,
)
from icons_dagster.core.schema import IconsConfig  # noqa: E402
from icons_dagster.core.storage.artifacts import ArtifactStore  # noqa: E402
from icons_dagster.demo.bootstrap import bootstrap_demo  # noqa: E402

RATIOS = (0.05, 0.1, 0.2, 0.4, 0.6)
DIMS = (1024, 2560, 5120, 10240)
WARMUP_RATIOS = (0.05, 0.1, 0.2, 1.0)
SEEDS = (0, 1, 2)
ICONS_VARIANTS = ("icons-paper", "icons-cover-50", "icons-cover-100")  # the paper's vote and two coverage reserves


def run_icons(home: Path, config: IconsConfig, instance) -> tuple[dict, dict]:
    """The ICONS graph under ``config`` (cached artifacts reused); the pool and vote-table refs."""
    from icons_dagster.runner import run_graph

    run_graph(home, config, instance=instance, methods=("icons",))
    store = ArtifactStore(home)
    return store.read_ref("training_pool"), store.read_ref("vote_table")


def evaluate(home: Path, config: IconsConfig, pool_ref: dict, vote_ref: dict, methods: tuple[str, ...], p: float) -> tuple[dict, dict, list]:
    """{method: {benchmark: score}}, {method: set of ids} for ``methods`` at ratio ``p``, and the
    benchmarks Rel. averages (where the full-data model beats chance)."""
    store = ArtifactStore(home)
    paths, model_config = config.data, config.model
    lora = config.evaluation.lora_for(config.lora)
    evaluation = dataclasses.replace(config.evaluation, methods=methods)
    benchmarks, image_root = paths.benchmarks_path(), paths.image_root_path()
    subsets = stage_evaluation_subsets(store, pool_ref, vote_ref, {}, evaluation, p, benchmarks, image_root).ref
    frame = pl.read_parquet(store.absolute(subsets.path) / SUBSETS_FILE)
    scores, chosen, informative = {}, {}, []
    for method in methods:
        adapter = stage_finetune(store, method, pool_ref, subsets, model_config, lora, evaluation, image_root=image_root).ref
        result = stage_benchmark_scores(store, method, adapter, benchmarks, image_root, model_config, evaluation).ref
        scores[method] = result.scores
        chosen[method] = set(frame.filter(pl.col("method") == method)["id"].to_list())
        if method == "full":
            informative = informative_benchmarks(result.scores, result.chance, result.n)[0]
    return scores, chosen, informative


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def rel_rows(scores: dict, informative: list[str]) -> tuple[dict, dict]:
    """Rel. per method over the informative benchmarks and over all (with the random seeds' mean as 'random')."""
    table = dict(scores)
    seeds = [m for m in scores if m.startswith("random-")]
    if seeds:
        benchmarks = list(scores[seeds[0]])
        table["random"] = {b: sum(scores[m][b] for m in seeds) / len(seeds) for b in benchmarks}
    return relative_scores(table, benchmarks=informative), relative_scores(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default="/tmp/icons-ablations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="ratio,dim,warmup,seed")
    parser.add_argument("--out", default=str(Path(__file__).with_name("evaluation_ablations.json")))
    args = parser.parse_args()
    import torch
    from dagster import DagsterInstance

    torch.set_num_threads(args.threads)
    home = Path(args.home)
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    instance = DagsterInstance.local_temp(str(home / "dagster"), overrides={"telemetry": {"enabled": False}})
    parts = set(args.only.split(","))
    results: dict = {"threads": args.threads, "seconds": {}}
    start = time.perf_counter()

    base_config = bootstrap_demo(home)
    pool_ref, base_votes = run_icons(home, base_config, instance)
    base_scores, base_chosen, informative = evaluate(home, base_config, pool_ref, base_votes, ("full", *ICONS_VARIANTS), 0.2)
    full = base_scores["full"]
    results["rel_benchmarks"] = informative

    if "ratio" in parts:
        t = time.perf_counter()
        results["ratio"] = {}
        for p in RATIOS:
            scores, _, _ = evaluate(home, base_config, pool_ref, base_votes, ("full", "random-0", "random-1", "random-2", *ICONS_VARIANTS), p)
            rel, rel_all = rel_rows(scores, informative)
            results["ratio"][str(p)] = {"scores": scores, "rel": rel, "rel_all": rel_all}
            print(f"p={p}: " + ", ".join(f"{m} {r * 100:.1f}" for m, r in results["ratio"][str(p)]["rel"].items()), flush=True)
        results["seconds"]["ratio"] = round(time.perf_counter() - t, 1)

    sweeps = {
        "dim": [({"gradients": {"dim": d}}, d) for d in DIMS],
        "warmup": [({"warmup": {"ratio": w}}, w) for w in WARMUP_RATIOS],
        "seed": [({"warmup": {"seed": s}, "gradients": {"seed": s}}, s) for s in SEEDS],
    }
    for name, variants in sweeps.items():
        if name not in parts:
            continue
        t = time.perf_counter()
        results[name] = {}
        for sections, value in variants:
            config = base_config.replace(**sections)
            _, votes = run_icons(home, config, instance)
            scores, chosen, _ = evaluate(home, config, pool_ref, votes, ("full", *ICONS_VARIANTS), 0.2)
            scores["full"] = full
            rel, rel_all = rel_rows(scores, informative)
            results[name][str(value)] = {
                "scores": scores,
                "rel": rel,
                "rel_all": rel_all,
                "jaccard_vs_default": {m: round(jaccard(chosen[m], base_chosen[m]), 3) for m in ICONS_VARIANTS},
            }
            print(f"{name}={value}: " + ", ".join(f"{m} {r * 100:.1f}" for m, r in rel.items()), results[name][str(value)]["jaccard_vs_default"], flush=True)
        results["seconds"][name] = round(time.perf_counter() - t, 1)
    results["seconds"]["total"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out} ({results['seconds']['total']} s)")


if __name__ == "__main__":
    main()
