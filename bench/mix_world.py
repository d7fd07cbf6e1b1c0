"""The mix world's protocol beyond the main table (docs/preregistration-mix.md, section 4).

- ``gate``: the base-model gate, before any selector is compared: full and random-0..4,
  (a) random's mean Rel. >= 90% of full, (b) full beats chance on >= 7 of 10 benchmarks,
  a yes/no and a multiple-choice one among them;
- ``seeds``: the whole pipeline (warm-up seed = projection seed) 0, 1, 2, every protocol
  method (the candidate defaults' levers included) at p = 0.2 (full and the random fine-tunes are shared between pipeline seeds);
- ``ratios``: Figure 4, p = 5/10/20/40/60% with pipeline seed 0: full, random-0..2, the
  paper's vote and the default.

Each part runs the graph through Dagster in one home (``evaluate --size mix`` builds the
same world and base model), so every artifact is computed once and reused across parts.
The main table itself is ``icons-dagster evaluate --size mix``. ``seeds`` also pools each
method's three pipeline seeds into one difference to random with one interval (the same
paired resamples). ``--size default`` runs the parts on the disjoint demo instead: section
5's constraint on a candidate default (change log, "the demo constraint").

Usage: python bench/mix_world.py [--size mix|default|...] [--home DIR] [--only gate,seeds,ratios] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

from icons_dagster.core.data.benchmarks import declared_answers
from icons_dagster.core.evaluation.metrics import informative_benchmarks
from icons_dagster.core.evaluation.statistics import bootstrap_rel_differences
from icons_dagster.core.schema import IconsConfig
from icons_dagster.core.stages.evaluation import BOOTSTRAP_SEED, aligned_record_scores
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.demo.bootstrap import bootstrap_demo, demo_sizes

RANDOMS = tuple(f"random-{seed}" for seed in range(5))
PROTOCOL_METHODS = (
    "full", *RANDOMS, "icons-paper", "icons", "icons-cover-25", "icons-cover-50", "icons-cover-100",
    "icons-wvote", "icons-quota", "icons-cluster", "icons-filter", "ofa", "text-vote", "specialist",
)  # fmt: skip
PIPELINE_SEEDS = (0, 1, 2)
RATIOS = (0.05, 0.1, 0.2, 0.4, 0.6)
RATIO_METHODS = ("full", "random-0", "random-1", "random-2", "icons-paper", "icons")
GATE_RANDOM_REL = 0.90
GATE_INFORMATIVE = 7


def evaluate(home: Path, config: IconsConfig, methods: tuple[str, ...], instance) -> dict:
    """Run the graph with ``methods`` evaluated; the table's Rel. numbers and each method's scores."""
    from icons_dagster.runner import run_graph

    config = config.replace(evaluation={"methods": list(methods)})
    run_graph(home, config, instance=instance, methods=("icons", "ofa", "evaluation"))
    store = ArtifactStore(home)
    table = store.read_ref("evaluation_table")
    scores = {m: store.read_ref("benchmark_scores", m) for m in methods}
    used, excluded = informative_benchmarks(scores["full"].scores, scores["full"].chance, scores["full"].n)
    return {
        "scores": {m: ref.scores for m, ref in scores.items()},
        "rel": table.rel,
        "rel_all": table.rel_all,
        "rel_benchmarks": used,
        "excluded_from_rel": excluded,
        "rel_vs_random": table.rel_vs_random,
        "rel_all_vs_random": table.rel_all_vs_random,
        "score_refs": {m: ref for m, ref in scores.items()},
    }


def pooled_over_seeds(home: Path, config: IconsConfig, by_seed: dict[int, dict]) -> dict:
    """Each selector's mean difference to random over the pipeline seeds, with its paired
    bootstrap interval (Rel. and Rel. all). ``full`` and the random fine-tunes are shared by
    the seeds (the same artifact in each); a selector's seeds are its pooled row's members."""
    first = by_seed[min(by_seed)]
    shared = ("full", *RANDOMS)
    for seed, result in by_seed.items():
        moved = [m for m in shared if result["score_refs"][m].path != first["score_refs"][m].path]
        if moved:
            raise RuntimeError(f"pipeline seed {seed} fine-tuned {moved} again: they should not depend on the pipeline seed")
    refs = {m: first["score_refs"][m] for m in shared}
    pooled: dict[str, list[str]] = {}
    for method in first["score_refs"]:
        if method in shared:
            continue
        pooled[method] = [f"{method}@{seed}" for seed in by_seed]
        refs.update({f"{method}@{seed}": result["score_refs"][method] for seed, result in by_seed.items()})
    aligned = aligned_record_scores(ArtifactStore(home), refs)
    common = {"random_methods": list(RANDOMS), "resamples": config.evaluation.bootstrap_resamples, "seed": BOOTSTRAP_SEED, "pooled": pooled}
    rel = bootstrap_rel_differences(aligned, benchmarks=first["rel_benchmarks"], **common)
    rel_all = bootstrap_rel_differences(aligned, **common)
    return {
        "seeds": sorted(by_seed),
        "rel": {m: rel[m] for m in pooled},
        "rel_all": {m: rel_all[m] for m in pooled},
        "meets_demo_constraint": {m: rel[m]["high"] >= 0 for m in pooled},  # section 5: the interval includes 0 or lies above it
    }


def gate(result: dict, benchmarks: Path) -> dict:
    """The pre-registered gate on full and random-0..4 (section 3)."""
    randoms = [result["rel"][m] for m in RANDOMS]  # Rel., the primary measure (section 4)
    used = result["rel_benchmarks"]
    kinds = {b: declared_answers(benchmarks / b) for b in used}
    closed = {kind: [b for b in used if kinds[b] == kind] for kind in ("yes_no", "multiple_choice")}
    return {
        "random_rel_mean": sum(randoms) / len(randoms),
        "random_rel": dict(zip(RANDOMS, randoms, strict=True)),
        "random_rel_all_mean": sum(result["rel_all"][m] for m in RANDOMS) / len(RANDOMS),
        "informative": used,
        "informative_closed_form": closed,
        "passed_a": sum(randoms) / len(randoms) >= GATE_RANDOM_REL,
        "passed_b": len(used) >= GATE_INFORMATIVE and all(closed.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mix", choices=demo_sizes(), help="the world: mix, or a demo size (section 5's constraint)")
    parser.add_argument("--home", default=None, help="default: /tmp/icons-<size>")
    parser.add_argument("--only", default="gate,seeds,ratios")
    parser.add_argument("--out", default=None, help="default: bench/mix_world.json, or bench/seeds_<size>.json for a demo size")
    args = parser.parse_args()
    args.home = args.home or f"/tmp/icons-{args.size}"
    args.out = args.out or str(Path(__file__).with_name("mix_world.json" if args.size == "mix" else f"seeds_{args.size}.json"))
    from dagster import DagsterInstance

    home = Path(args.home)
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    instance = DagsterInstance.local_temp(str(home / "dagster"), overrides={"telemetry": {"enabled": False}})
    parts = args.only.split(",")
    out = Path(args.out)
    results: dict = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("seconds", {})
    base = bootstrap_demo(home, args.size)
    results["size"] = args.size

    def save() -> None:
        out.write_text(json.dumps(results, indent=1, sort_keys=True, default=_no_refs) + "\n")

    for part in parts:
        started = time.perf_counter()
        if part == "gate":
            result = evaluate(home, base, ("full", *RANDOMS), instance)
            results["gate"] = {**result, "gate": gate(result, base.data.benchmarks_path())}
            print("gate:", json.dumps(results["gate"]["gate"]), flush=True)
        elif part == "seeds":
            results["seeds"], by_seed = {}, {}
            for seed in PIPELINE_SEEDS:
                config = base.replace(warmup={"seed": seed}, gradients={"seed": seed})
                by_seed[seed] = results["seeds"][str(seed)] = evaluate(home, config, PROTOCOL_METHODS, instance)
                print(f"pipeline seed {seed}:", {m: round(100 * r, 1) for m, r in results["seeds"][str(seed)]["rel"].items()}, flush=True)
                save()
            results["pooled"] = pooled_over_seeds(home, base, by_seed)
            print("pooled over pipeline seeds (Rel. difference to random):", {m: round(100 * d["difference"], 1) for m, d in results["pooled"]["rel"].items()}, flush=True)
        elif part == "ratios":
            results["ratios"] = {}
            for p in RATIOS:
                config = base.replace(selection={"p": p}, ofa={"p": p})
                results["ratios"][str(p)] = evaluate(home, config, RATIO_METHODS, instance)
                print(f"p = {p}:", {m: round(100 * r, 1) for m, r in results["ratios"][str(p)]["rel"].items()}, flush=True)
                save()
        else:
            raise SystemExit(f"unknown part {part!r}: gate, seeds, ratios")
        results["seconds"][part] = round(time.perf_counter() - started, 1)
        save()
    print(f"wrote {out}")


def _no_refs(value):
    """JSON for the results: the score refs stay in memory (their paths are the home's)."""
    if hasattr(value, "path"):
        return value.path
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


if __name__ == "__main__":
    main()
