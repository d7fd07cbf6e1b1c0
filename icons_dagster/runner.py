"""Launching the asset graph through Dagster on the home's persistent instance.

A run may hold partitions of one partitions definition plus unpartitioned assets, never
two partitions definitions, so the graph runs as a sequence of runs: the unpartitioned
head, one run per training shard, one run over the range of benchmarks (their
validation features, then every benchmark's influence in one pass over the training
features, as a single-run backfill does), then the vote. Every run lands in the instance
under ``<home>/dagster``, so ``dagster dev`` on the same home shows the same runs,
lineage and metadata.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icons_dagster.core.schema import IconsConfig
from icons_dagster.core.storage.artifacts import ArtifactStore

DAGSTER_YAML = """# Written by icons-dagster: a local instance under the store root.
telemetry:
  enabled: false
# vote_table and selected_subset share the pool "icons_selection": one writer at a time.
concurrency:
  pools:
    default_limit: 1
"""


def prepare_instance_home(home: Path) -> Path:
    """Point DAGSTER_HOME at ``<home>/dagster`` (created with telemetry off)."""
    dagster_home = ArtifactStore(home).dagster_home
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML, encoding="utf-8")
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    os.environ["ICONS_HOME"] = str(home)
    return dagster_home


@dataclass(frozen=True)
class Step:
    label: str
    assets: tuple[str, ...]
    partition: str | None = None
    partition_range: tuple[str, str] | None = None  # (first, last): one run over the range

    def tags(self) -> dict[str, str]:
        from icons_dagster.partitions import partition_range_tags

        return {"icons/step": self.label, **(partition_range_tags(*self.partition_range) if self.partition_range else {})}


METHODS = ("icons", "ofa", "evaluation")


def plan_steps(
    shards: list[str], benchmark_ranges: list[tuple[str, str]], methods: tuple[str, ...] = ("icons",), evaluation_methods: tuple[str, ...] = ()
) -> list[Step]:
    """The runs, in order. ``benchmark_ranges``: (first, last) registered benchmarks of each
    run over benchmarks (see ``contiguous_ranges``)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or methods}; choose from {METHODS}")
    icons, ofa = "icons" in methods, "ofa" in methods
    head = ("training_pool", "warmup_subset", "warmup_checkpoint") if icons else ("training_pool",)
    steps = [Step("pool, warm-up subset and warm-up checkpoint" if icons else "pool", head)]
    per_shard = (("training_gradients",) if icons else ()) + (("ofa_embeddings",) if ofa else ())
    steps += [Step(f"{' + '.join(per_shard)}[{s}]", per_shard, s) for s in shards]
    if icons:
        per_benchmark = ("validation_gradients", "task_influence")
        steps += [Step(f"{' + '.join(per_benchmark)}[{a}{'' if a == b else '...' + b}]", per_benchmark, partition_range=(a, b)) for a, b in benchmark_ranges]
        steps.append(Step("vote_table and selected_subset", ("vote_table", "selected_subset")))
    if ofa:
        steps.append(Step("OFA pseudo labels, selector and subset", ("ofa_pseudo_labels", "ofa_selector", "ofa_selected_subset")))
    if "evaluation" in methods:
        if not (icons and ofa):
            raise ValueError("the evaluation compares every method: run it with icons and ofa")
        from icons_dagster.partitions import evaluation_method_partitions

        steps.append(Step("evaluation subsets", ("evaluation_subsets",)))
        keys = evaluation_methods or tuple(evaluation_method_partitions.get_partition_keys())
        steps += [Step(f"fine-tune + scores[{m}]", ("finetuned_adapter", "benchmark_scores"), m) for m in keys]
        steps.append(Step("evaluation table", ("evaluation_table",)))
    return steps


def run_graph(
    home: Path,
    config: IconsConfig,
    instance=None,
    on_step: Callable[[int, int, Step], None] | None = None,
    log_level: str = "WARNING",
    methods: tuple[str, ...] = ("icons",),
) -> dict[str, Any]:
    """Register benchmarks and materialize the whole graph; returns the subset's location and stats."""
    from dagster import AssetKey, DagsterInstance, materialize

    from icons_dagster.core.stages.ofa import EXPORT_PREFIX, SELECTOR_DIR
    from icons_dagster.core.stages.icons import SUBSET_JSON, SUBSET_PARQUET
    from icons_dagster.definitions import build_resources, graph_assets
    from icons_dagster.partitions import BENCHMARKS_PARTITION_NAME, contiguous_ranges
    from icons_dagster.core.data.pool import shard_keys
    from icons_dagster.registration import register_benchmarks

    resources = build_resources(home, config)
    if instance is None:
        prepare_instance_home(home)
        instance = DagsterInstance.get()
    store = ArtifactStore(home)
    benchmarks_dir = config.data.benchmarks_path()
    benchmarks, _ = register_benchmarks(instance, benchmarks_dir)
    if not benchmarks and "icons" in methods:
        raise ValueError(f"no benchmark with a val.json / val.jsonl under {benchmarks_dir}")
    assets = graph_assets(config)  # code versions = settings fingerprints
    ranges = contiguous_ranges(instance.get_dynamic_partitions(BENCHMARKS_PARTITION_NAME), benchmarks)
    steps = plan_steps(shard_keys(config.data.num_shards), ranges, methods, config.evaluation.partition_methods())
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    for index, step in enumerate(steps):
        if on_step is not None:
            on_step(index, len(steps), step)
        result = materialize(
            assets,
            selection=[AssetKey(name) for name in step.assets],
            partition_key=step.partition,
            instance=instance,
            resources=resources,
            run_config=run_config,
            tags=step.tags(),
        )
        if not result.success:
            raise RuntimeError(f"step failed: {step.label}")
    summary: dict[str, Any] = {"benchmarks": benchmarks, "steps": len(steps), "dagster_home": str(store.dagster_home)}
    if "icons" in methods:
        summary["subset_json"] = str(store.export_path(SUBSET_JSON))
        summary["subset_parquet"] = str(store.export_path(SUBSET_PARQUET))
    if "ofa" in methods:
        summary["ofa_subset_json"] = str(store.export_path(EXPORT_PREFIX + SUBSET_JSON))
        summary["ofa_subset_parquet"] = str(store.export_path(EXPORT_PREFIX + SUBSET_PARQUET))
        summary["ofa_selector"] = str(store.export_path(EXPORT_PREFIX + SELECTOR_DIR))
    if "evaluation" in methods:
        from icons_dagster.core.stages.evaluation import TABLE_MARKDOWN

        table = store.read_ref("evaluation_table")
        summary["evaluation_table"] = str(store.absolute(table["path"]) / TABLE_MARKDOWN)
        summary["rel"] = table["rel"]
    return summary
