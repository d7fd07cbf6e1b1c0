"""In-process stand-ins for the Dagster daemon, for tests and benchmarks.

``build_sensor_context`` does not apply a sensor's dynamic-partition requests and
``evaluate_automation_conditions`` only reports what it would request; these helpers
apply and run them on a given instance the way the daemons do (the requested benchmarks
of the benchmark-partitioned assets in one run per contiguous range, as the automation
sensor's backfill does under their single-run backfill policy; the unpartitioned vote and
subset once after them, in the runner's waves), with nothing but public Dagster APIs.
"""

from __future__ import annotations

from dagster import (
    AddDynamicPartitionsRequest,
    DagsterInstance,
    SkipReason,
    build_sensor_context,
    evaluate_automation_conditions,
    materialize,
)

from icons_dagster.automation import benchmark_folder_sensor
from icons_dagster.partitions import BENCHMARKS_PARTITION_NAME, contiguous_ranges, partition_range_tags
from icons_dagster.steps import run_waves


def apply_benchmark_sensor(instance: DagsterInstance, assets: list, resources: dict) -> SkipReason | None:
    """One tick of the benchmark folder sensor: apply its partition requests, run its run requests."""
    result = benchmark_folder_sensor()(build_sensor_context(instance=instance, resources=resources))
    if isinstance(result, SkipReason):
        return result
    for request in result.dynamic_partitions_requests:
        if isinstance(request, AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    for run_request in result.run_requests:
        if not materialize(assets, selection=run_request.asset_selection, instance=instance, resources=resources).success:
            raise RuntimeError(f"run requested by the sensor failed: {run_request.asset_selection}")
    return None


def run_automation(instance: DagsterInstance, defs, assets: list, resources: dict, cursor=None, max_ticks: int = 5):
    """Evaluate the automation conditions and run what they request until they request nothing.

    The requested assets run in the runner's waves (``run_waves``: graph order, one
    partitions definition per run); within a wave, the assets asking for the same
    benchmarks run together, one run per contiguous range of them."""
    asset_graph = defs.resolve_asset_graph()
    for _ in range(max_ticks):
        result = evaluate_automation_conditions(defs, instance, cursor=cursor)
        cursor = result.cursor
        if not result.total_requested:
            return cursor
        requested = {a.key: set(result.get_requested_partitions(a.key)) for a in assets}
        requested = {key: wanted for key, wanted in requested.items() if wanted}
        order = instance.get_dynamic_partitions(BENCHMARKS_PARTITION_NAME)
        runs = []
        for partitions, keys in run_waves(asset_graph, requested):
            if partitions is None:
                runs.append((keys, {}))
                continue
            by_benchmarks: dict[frozenset, list] = {}
            for key in keys:
                by_benchmarks.setdefault(frozenset(requested[key]), []).append(key)
            runs += [(selection, partition_range_tags(*span)) for wanted, selection in by_benchmarks.items() for span in contiguous_ranges(order, wanted)]
        for selection, tags in runs:
            if not materialize(assets, selection=selection, tags=tags, instance=instance, resources=resources).success:
                raise RuntimeError(f"automation run failed: {selection} {tags}")
    raise RuntimeError(f"automation still requested runs after {max_ticks} ticks")
