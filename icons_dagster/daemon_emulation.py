"""In-process stand-ins for the Dagster daemon, for tests and benchmarks.

``build_sensor_context`` does not apply a sensor's dynamic-partition requests and
``evaluate_automation_conditions`` only reports what it would request; these helpers
apply and run them on a given instance the way the daemon does (one run per partition,
the unpartitioned vote and subset once after them), with nothing but public Dagster APIs.
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


def apply_benchmark_sensor(instance: DagsterInstance, assets: list, resources: dict) -> SkipReason | None:
    """One tick of the benchmark folder sensor: apply its partition requests, run its run requests."""
    result = benchmark_folder_sensor(build_sensor_context(instance=instance, resources=resources))
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
    """Evaluate the automation conditions and run what they request until they request nothing."""
    keys = [a.key for a in assets]
    for _ in range(max_ticks):
        result = evaluate_automation_conditions(defs, instance, cursor=cursor)
        cursor = result.cursor
        if not result.total_requested:
            return cursor
        by_partition: dict = {}
        for key in keys:
            for partition in result.get_requested_partitions(key):
                by_partition.setdefault(partition, []).append(key)
        # Partitioned work first, then the unpartitioned vote and subset once for all of it.
        for partition in sorted(by_partition, key=lambda p: (p is None, p or "")):
            ok = materialize(assets, selection=by_partition[partition], partition_key=partition, instance=instance, resources=resources).success
            if not ok:
                raise RuntimeError(f"automation run failed: {by_partition[partition]} [{partition}]")
    raise RuntimeError(f"automation still requested runs after {max_ticks} ticks")
