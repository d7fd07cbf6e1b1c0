"""Cost of adding one benchmark vs recomputing everything, on the embedded demo.

Baseline (same run, same machine): a from-scratch materialization of the whole graph with
all six demo benchmarks. Incremental: the graph already materialized with five; the sixth
folder is dropped in, the benchmark sensor ticks and the eager automation runs
(validation_gradients[new], task_influence[new], vote_table, selected_subset). Both end in
byte-identical subsets, which the script checks.

Usage: python bench/add_benchmark.py [--size default|test] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from dagster import DagsterInstance, evaluate_automation_conditions  # noqa: E402

from icons_dagster.core.schema import IconsConfig  # noqa: E402
from icons_dagster.daemon_emulation import apply_benchmark_sensor, run_automation  # noqa: E402
from icons_dagster.definitions import build_definitions, build_resources, graph_assets  # noqa: E402
from icons_dagster.demo.bootstrap import DEFAULT_STAGE1_STEPS, demo_settings, stage1_records  # noqa: E402
from icons_dagster.demo.data import generate_demo  # noqa: E402
from icons_dagster.demo.stage1 import ensure_stage1_model  # noqa: E402
from icons_dagster.runner import run_graph  # noqa: E402


def instance_at(folder: Path) -> DagsterInstance:
    (folder / "dagster").mkdir(parents=True, exist_ok=True)
    return DagsterInstance.local_temp(str(folder / "dagster"), overrides={"telemetry": {"enabled": False}})


def config_for(demo, benchmarks: Path, base_model: Path) -> IconsConfig:
    data = {"pool": str(demo.pool), "image_root": str(demo.image_root), "benchmarks": str(benchmarks)}
    # both sides start from the built base model
    return IconsConfig.from_json(demo_settings(data=data, model={"name_or_path": str(base_model)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="default", choices=["default", "test"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="icons-add-bench-"))
    demo = generate_demo(work / "demo", size=args.size)
    names = sorted(p.name for p in demo.benchmarks.iterdir())
    new = names[-1]
    # the demo's stage-1 base model stands for a user's checkpoint: built before the clock starts
    base_model = ensure_stage1_model(work / "base", DEFAULT_STAGE1_STEPS, stage1_records(DEFAULT_STAGE1_STEPS))

    full_dir = work / "full"
    start = time.perf_counter()
    full = run_graph(full_dir, config_for(demo, demo.benchmarks, base_model), instance=instance_at(full_dir))
    t_full = time.perf_counter() - start

    inc_dir = work / "incremental"
    benchmarks = inc_dir / "benchmarks"
    for name in names[:-1]:
        shutil.copytree(demo.benchmarks / name, benchmarks / name)
    config = config_for(demo, benchmarks, base_model)
    instance = instance_at(inc_dir)
    run_graph(inc_dir, config, instance=instance)
    defs = build_definitions(inc_dir, config)
    resources = build_resources(inc_dir, config)
    assets = graph_assets(config)
    cursor = evaluate_automation_conditions(defs, instance).cursor
    shutil.copytree(demo.benchmarks / new, benchmarks / new)
    start = time.perf_counter()
    apply_benchmark_sensor(instance, assets, resources)
    run_automation(instance, defs, assets, resources, cursor)
    t_add = time.perf_counter() - start

    same = hashlib.sha256(Path(full["subset_json"]).read_bytes()).digest() == hashlib.sha256(
        (inc_dir / "exports" / "selected_subset.json").read_bytes()
    ).digest()
    print(f"demo size {args.size}: {len(names)} benchmarks, {config.data.num_shards} shards, torch threads {args.threads}")
    print(f"full recompute (all {len(names)} benchmarks): {t_full:.1f} s")
    print(f"add benchmark {new!r} (sensor + automation): {t_add:.1f} s")
    print(f"ratio full / add: {t_full / t_add:.1f}x; subsets byte-identical: {same}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
