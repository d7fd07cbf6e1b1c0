"""The graph as a sequence of runs of named jobs, executed in this process.

A run may hold partitions of one partitions definition, never two, so the graph runs as
a sequence of runs derived from the asset graph itself (``run_waves``): in graph order,
each asset joins the first run of its partitions definition after its upstream assets'
runs. For the ICONS graph that is the unpartitioned head, one run per training shard, one
run over the range of benchmarks (their validation features, then every benchmark's
influence in one pass over the training features, as a single-run backfill does), then
the vote; a new asset needs no edit here. Each run is a subset of the named job of its
partitions definition (``jobs.graph_job_names``), created with the origin the UI loads
that job from, so it links to its job and re-executes from the UI.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icons_dagster.core.schema import IconsConfig
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.jobs import asset_jobs, run_origins


class StepFailed(RuntimeError):
    """A run of the graph failed: which step, the cause in one line, the run to read in full."""

    def __init__(self, step: str, cause: str, run_id: str):
        super().__init__(f"step {step} failed: {cause}")
        self.step, self.cause, self.run_id = step, cause, run_id


def failure_cause(result) -> str:
    """The first line of the innermost error of a failed run's first failed step."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            error = event.step_failure_data.error
            while error is not None and error.cause is not None:
                error = error.cause
            if error is not None:
                lines = (error.message or "").strip().splitlines()
                text = lines[0] if lines else (error.cls_name or "error")
                prefix = f"{error.cls_name}: "
                return text[text.index(prefix) + len(prefix) :] if error.cls_name and prefix in text else text  # "pkg.mod.Cls: why" -> "why"
    return "the run failed before any step (see its log)"


@dataclass(frozen=True)
class Step:
    """One run: assets of one partitions definition, for one partition or one range of them."""

    assets: tuple[str, ...]
    partition: str | None = None
    partition_range: tuple[str, str] | None = None  # (first, last): one run over the range

    @property
    def label(self) -> str:
        names = " + ".join(self.assets)
        if self.partition is not None:
            return f"{names}[{self.partition}]"
        if self.partition_range is not None:
            first, last = self.partition_range
            return f"{names}[{first}{'' if first == last else '...' + last}]"
        return names

    def tags(self) -> dict[str, str]:
        from icons_dagster.partitions import partition_range_tags

        return {"icons/step": self.label, **(partition_range_tags(*self.partition_range) if self.partition_range else {})}


def run_waves(asset_graph, keys) -> list[tuple[Any, list]]:
    """The selected assets as an ordered list of (partitions definition, asset keys): one
    Dagster run holds one partitions definition, so each asset, in graph order, joins the
    first wave of its partitions definition that comes at or after the waves of all its
    selected upstream assets (the same wave only when that shares its partitions)."""
    selected = set(keys)
    waves: list[tuple[Any, list]] = []
    placed: dict = {}
    for key in asset_graph.toposorted_asset_keys:
        if key not in selected:
            continue
        node = asset_graph.get(key)
        partitions = node.partitions_def
        upstream = [placed[parent] for parent in node.parent_keys if parent in placed]
        earliest = max(upstream, default=0)
        # an upstream asset of another partitions definition must have finished in an earlier run
        if any(placed[p] == earliest and waves[earliest][0] != partitions for p in node.parent_keys if p in placed):
            earliest += 1
        index = next((i for i in range(earliest, len(waves)) if waves[i][0] == partitions), None)
        if index is None:
            waves.append((partitions, []))
            index = len(waves) - 1
        waves[index][1].append(key)
        placed[key] = index
    return waves


def selected_keys(asset_graph, methods: tuple[str, ...]) -> set:
    """The assets of the methods' asset groups (a CLI method is a group: icons, ofa,
    evaluation) and every asset upstream of them."""
    groups = {asset_graph.get(key).group_name for key in asset_graph.toposorted_asset_keys}
    unknown = sorted(set(methods) - groups)
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or methods}; choose from {sorted(groups)}")
    pending = [key for key in asset_graph.toposorted_asset_keys if asset_graph.get(key).group_name in methods]
    keys: set = set()
    while pending:
        key = pending.pop()
        if key not in keys:
            keys.add(key)
            pending.extend(asset_graph.get(key).parent_keys)
    return keys


def plan_steps(asset_graph, methods: tuple[str, ...], partition_keys: dict[Any, list[str]], benchmark_ranges: list[tuple[str, str]]) -> list[Step]:
    """The runs, in order: each wave of ``run_waves`` once when unpartitioned, once per
    contiguous range of benchmarks (dynamic partitions, as a single-run backfill does), and
    once per key of any other partitions definition (``partition_keys`` may narrow them)."""
    from dagster import DynamicPartitionsDefinition

    steps = []
    for partitions, keys in run_waves(asset_graph, selected_keys(asset_graph, methods)):
        names = tuple(key.to_user_string() for key in keys)
        if partitions is None:
            steps.append(Step(names))
        elif isinstance(partitions, DynamicPartitionsDefinition):
            steps += [Step(names, partition_range=span) for span in benchmark_ranges]
        else:
            steps += [Step(names, key) for key in partition_keys.get(partitions, partitions.get_partition_keys())]
    return steps


def check_subset_sizes(store: ArtifactStore, config: IconsConfig) -> None:
    """Right after the pool is read, before any gradient: p must select records of what survived."""
    from icons_dagster.core.selection.consensus import subset_size

    n = store.read_ref("training_pool").n_records
    try:
        subset_size(n, config.selection.p)
    except ValueError as error:
        raise ValueError(f"selection.p: {error}: raise --p; the pool has {n} valid records (training_pool's metadata lists the skipped ones)") from None


INVOCATION_TAG = "icons/invocation"  # on every run of one CLI command: filter the UI's runs by it


def new_invocation_id() -> str:
    """A readable, sortable id for one command's runs: its start time and 6 random hex digits."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def execute_step(repository, job_name: str, step: Step, instance, tags: dict[str, str], run_config: dict):
    """One run of ``step``'s assets as a subset of the named job, created with the origin the
    UI loads the job from (so the run links to its job and re-executes), executed here."""
    from dagster import AssetKey
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.execution.api import execute_run
    from dagster._core.storage.tags import PARTITION_NAME_TAG


    job = repository.get_job(job_name)
    selection = frozenset(AssetKey(name) for name in step.assets)
    remote_origin, python_origin = run_origins(job_name)
    run = instance.create_run_for_job(
        job.get_subset(asset_selection=selection),
        run_config=run_config,
        tags={**job.run_tags, **tags, **step.tags(), **({PARTITION_NAME_TAG: step.partition} if step.partition is not None else {})},
        asset_selection=selection,
        remote_job_origin=remote_origin,
        job_code_origin=python_origin,
    )
    return execute_run(InMemoryJob(job), run, instance, raise_on_error=False)  # the cause goes to the caller in one line


def materialize_graph(
    repository,
    home: Path,
    config: IconsConfig,
    instance,
    on_step: Callable[[int, int, Step], None] | None = None,
    log_level: str = "WARNING",
    on_wait: Callable[[str], None] | None = None,
    methods: tuple[str, ...] = ("icons",),
    invocation: str | None = None,
) -> dict[str, Any]:
    """Register benchmarks and materialize the methods' assets of ``repository`` (the home's
    definitions for ``config``); returns the subset's location and stats.

    Each step is a run of a named job, tagged with ``invocation`` (new when not given). A
    step whose assets claim a pool starts only once the pool has room (``on_wait`` is told
    which run it waits for; the wait is interruptible, see run_guard.py)."""
    from icons_dagster.core.stages.ofa import EXPORT_PREFIX, SELECTOR_DIR
    from icons_dagster.core.stages.icons import SUBSET_JSON, SUBSET_PARQUET
    from icons_dagster.partitions import BENCHMARKS_PARTITION_NAME, contiguous_ranges, evaluation_method_partitions
    from icons_dagster.registration import register_benchmarks
    from icons_dagster.resources.home import write_home_config
    from icons_dagster.run_guard import wait_for_pools

    invocation = invocation or new_invocation_id()
    write_home_config(home, config)  # what the UI loads the jobs from when it re-executes a run
    store = ArtifactStore(home)
    benchmarks_dir = config.data.benchmarks_path()
    benchmarks, _ = register_benchmarks(instance, benchmarks_dir)
    if not benchmarks and "icons" in methods:
        raise ValueError(f"no benchmark with a val.json / val.jsonl under {benchmarks_dir}")
    assets = list(dict.fromkeys(repository.assets_defs_by_key.values()))  # one per multi-asset
    jobs = asset_jobs(assets, config)
    ranges = contiguous_ranges(instance.get_dynamic_partitions(BENCHMARKS_PARTITION_NAME), benchmarks)
    steps = plan_steps(repository.asset_graph, methods, {evaluation_method_partitions: list(config.evaluation.partition_methods())}, ranges)
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    pools = {key.to_user_string(): set(a.node_def.pools) for a in assets for key in a.keys}
    for index, step in enumerate(steps):
        if on_step is not None:
            on_step(index, len(steps), step)
        if step_pools := set().union(*(pools[name] for name in step.assets)):
            wait_for_pools(instance, step_pools, on_wait or (lambda message: None))
        result = execute_step(repository, jobs[step.assets[0]], step, instance, {INVOCATION_TAG: invocation}, run_config)
        if not result.success:
            raise StepFailed(step.label, failure_cause(result), result.run_id)
        if "training_pool" in step.assets:
            check_subset_sizes(store, config)
    summary: dict[str, Any] = {"benchmarks": benchmarks, "steps": len(steps), "dagster_home": str(store.dagster_home), "invocation": invocation}
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
        summary["evaluation_table"] = str(store.absolute(table.path) / TABLE_MARKDOWN)
        summary["rel"] = table.rel
    return summary
