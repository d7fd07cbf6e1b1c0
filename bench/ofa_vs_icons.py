"""ICONS vs OFA on the embedded demo: cost, reuse on a new pool, and what each subset holds.

Same machine, same run, same thread count; every method runs through the CLI in its own
process (model and embedder loads and imports included, as a user pays them):

- cost: ``run --method icons`` vs ``run --method ofa`` on pool A (fresh homes);
- reuse on pool B (another seed of the demo generator): ICONS must recompute everything
  (its warm-up and gradients depend on the pool), OFA applies A's selector
  (``--ofa-selector``) and only embeds B; we also train OFA on B itself to compare subsets;
- what the subsets hold (no fine-tuning here: issue 5's evaluation suite scores models):
  task-family shares (the demo records carry their family), each benchmark's coverage
  (share of its ICONS specialist top-p that the subset keeps), and overlaps.

Usage: python bench/ofa_vs_icons.py [--size default|test] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

from icons_dagster.core.schema import IconsConfig  # noqa: E402
from icons_dagster.demo.bootstrap import DEFAULT_STAGE1_STEPS, demo_settings, stage1_records  # noqa: E402
from icons_dagster.demo.data import generate_demo  # noqa: E402
from icons_dagster.demo.stage1 import ensure_stage1_model  # noqa: E402
from icons_dagster.resources.home import write_home_config  # noqa: E402


def cli(home: Path, *args: str, threads: int, model: Path) -> float:
    """Wall seconds of one ``icons-dagster run`` on a fresh home with the demo's settings and ``model``."""
    # `run` keeps what it does not override
    write_home_config(home, IconsConfig.from_json(demo_settings(model={"name_or_path": str(model)})))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "icons_dagster.cli", "--home", str(home), "run", *args]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def pool_args(demo) -> list[str]:
    return ["--pool", str(demo.pool), "--image-root", str(demo.image_root), "--benchmarks", str(demo.benchmarks)]


def families(demo) -> dict[str, str]:
    return {r["id"]: r.get("family") or "none" for r in json.loads(Path(demo.pool).read_text())}


def selected(parquet: Path) -> set[str]:
    return set(pl.read_parquet(parquet).filter(pl.col("selected"))["id"].to_list())


def family_shares(ids: set[str], family_of: dict[str, str]) -> dict[str, float]:
    names = sorted(set(family_of.values()))
    counts = {n: 0 for n in names}
    for i in ids:
        counts[family_of[i]] += 1
    return {n: counts[n] / max(1, len(ids)) for n in names}


def coverage(ids: set[str], vote_table: pl.DataFrame) -> dict[str, float]:
    """Per benchmark: share of its specialist top-p (its voters) that the subset keeps."""
    out = {}
    for column in [c for c in vote_table.columns if c.startswith("vote__")]:
        voters = set(vote_table.filter(pl.col(column))["id"].to_list())
        out[column.removeprefix("vote__")] = len(voters & ids) / max(1, len(voters))
    return out


def stage_seconds(home: Path) -> dict[str, float]:
    """Compute seconds per stage (summed over partitions), from the artifacts' manifests."""
    totals: dict[str, float] = {}
    for manifest in sorted((home / "artifacts").glob("*/*/**/_COMPLETE.json")):
        stage = manifest.relative_to(home / "artifacts").parts[0]
        seconds = json.loads(manifest.read_text())["metadata"].get("seconds", 0.0)
        totals[stage] = round(totals.get(stage, 0.0) + seconds, 2)
    return totals


def vote_table_of(home: Path) -> pl.DataFrame:
    ref = json.loads((home / "refs" / "vote_table" / "__unpartitioned__.json").read_text())
    return pl.read_parquet(home / ref.path / "vote_table.parquet")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="default", choices=["default", "test"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ofa-vs-icons-"))
    pool_a = generate_demo(work / "demo_a", size=args.size, seed=0)
    pool_b = generate_demo(work / "demo_b", size=args.size, seed=1)
    # the demo's stage-1 model, built once before any clock starts (every home names it)
    model = ensure_stage1_model(work / "model", DEFAULT_STAGE1_STEPS, stage1_records(DEFAULT_STAGE1_STEPS))
    t = {}
    t["icons_a"] = cli(work / "icons_a", *pool_args(pool_a), "--method", "icons", threads=args.threads, model=model)
    t["ofa_a"] = cli(work / "ofa_a", *pool_args(pool_a), "--method", "ofa", threads=args.threads, model=model)
    selector = work / "ofa_a" / "exports" / "ofa_selector"
    t["icons_b"] = cli(work / "icons_b", *pool_args(pool_b), "--method", "icons", threads=args.threads, model=model)
    t["ofa_b_reused"] = cli(work / "ofa_b_reused", *pool_args(pool_b), "--method", "ofa", "--ofa-selector", str(selector), threads=args.threads, model=model)
    t["ofa_b_trained"] = cli(work / "ofa_b", *pool_args(pool_b), "--method", "ofa", threads=args.threads, model=model)

    report: dict = {"wall_seconds_per_cli_run": {k: round(v, 1) for k, v in t.items()}, "threads": args.threads, "size": args.size}
    report["stage_seconds"] = {name: stage_seconds(work / name) for name in ("icons_a", "ofa_a", "icons_b", "ofa_b_reused")}
    report["ratios"] = {
        "icons_over_ofa_on_A": round(t["icons_a"] / t["ofa_a"], 2),
        "icons_on_B_over_ofa_reused_on_B": round(t["icons_b"] / t["ofa_b_reused"], 2),
    }
    for label, pool, icons_home, ofa_home in (("A", pool_a, "icons_a", "ofa_a"), ("B", pool_b, "icons_b", "ofa_b_reused")):
        family_of = families(pool)
        votes = vote_table_of(work / icons_home)
        subsets = {
            "icons": selected(work / icons_home / "exports" / "selected_subset.parquet"),
            "ofa": selected(work / ofa_home / "exports" / "ofa_selected_subset.parquet"),
        }
        if label == "B":
            subsets["ofa_trained_on_B"] = selected(work / "ofa_b" / "exports" / "ofa_selected_subset.parquet")
        m = len(subsets["icons"])
        rng = np.random.default_rng(0)
        pool_ids = sorted(family_of)
        subsets["random"] = set(rng.choice(pool_ids, size=m, replace=False).tolist())
        report[f"pool_{label}"] = {
            name: {
                "family_shares": {k: round(v, 3) for k, v in family_shares(ids, family_of).items()},
                "coverage": {k: round(v, 3) for k, v in coverage(ids, votes).items()},
            }
            for name, ids in subsets.items()
        }
        report[f"pool_{label}"]["overlap_icons_ofa"] = round(len(subsets["icons"] & subsets["ofa"]) / m, 3)
        if label == "B":
            report["pool_B"]["overlap_ofa_reused_vs_trained_on_B"] = round(len(subsets["ofa"] & subsets["ofa_trained_on_B"]) / m, 3)
    print(json.dumps(report, indent=2))
    out = Path(__file__).with_name("ofa_vs_icons.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
