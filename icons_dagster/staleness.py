"""Stale partitions, which Dagster's UI does not mark.

Dagster marks an unpartitioned asset stale when its code version changes, but never a
partitioned one (dagster-io/dagster#9374): after a change of ``selection.p``, the UI flags
``vote_table`` and ``selected_subset`` and not ``task_influence``, though its code version
(the fingerprint of its settings) changed too. The check ``partitions_at_current_code_version``
on every partitioned asset says the truth: it fails (severity WARN) naming each partition
whose latest materialization was made under another code version. It runs after every run
that materializes the asset, from the UI's "Execute" on the check, and from
``stale_partitions_sensor``, which reports it (without a run) whenever the answer changes,
so a configuration change shows on the asset page within one tick of the daemon.
"""

from __future__ import annotations

import json

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    AssetRecordsFilter,
    AssetsDefinition,
    DagsterEventType,
    DefaultSensorStatus,
    MetadataValue,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    asset_check,
    sensor,
)
from dagster._core.definitions.data_version import CODE_VERSION_TAG

STALE_CHECK = "partitions_at_current_code_version"
PAGE = 10_000  # Dagster's most event records per fetch
DESCRIPTION = (
    "Fails (WARN) when a partition's latest materialization was made under another code version "
    "(the fingerprint of the settings the asset depends on) than the current one: recompute those "
    "partitions. Dagster's UI marks no partitioned asset stale; this check does. Missing partitions "
    "are not stale (the UI shows them as missing)."
)


def stale_partitions(instance, key: AssetKey, current: str | None) -> dict[str, str | None]:
    """Partition -> the code version of its latest materialization, for those not at ``current``
    (one record per partition is read, however long the asset's history)."""
    latest_ids = instance.event_log_storage.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION)
    ids = sorted(latest_ids.values())
    latest: dict[str, str | None] = {}
    for start in range(0, len(ids), PAGE):
        records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, storage_ids=ids[start : start + PAGE]), limit=PAGE).records
        latest.update((r.partition_key, r.asset_materialization.tags.get(CODE_VERSION_TAG)) for r in records)
    return {partition: version for partition, version in sorted(latest.items()) if version != current}


def _evaluation(instance, key: AssetKey, current: str | None) -> dict:
    stale = stale_partitions(instance, key, current)
    return {
        "passed": not stale,
        "severity": AssetCheckSeverity.WARN,
        "description": f"{len(stale)} stale partition(s): {', '.join(stale)}" if stale else "every materialized partition is at the current code version",
        "metadata": {
            "current_code_version": MetadataValue.text(current or "none"),
            "stale_partitions": MetadataValue.json({p: v or "none" for p, v in stale.items()}),
        },
    }


def stale_partition_check(asset: AssetsDefinition):
    """The check on one partitioned asset."""
    key = asset.key

    @asset_check(asset=asset, name=STALE_CHECK, description=DESCRIPTION)
    def _check(context) -> AssetCheckResult:  # an AssetCheckExecutionContext
        current = context.op_execution_context.job_def.asset_layer.asset_graph.get(key).code_version
        return AssetCheckResult(**_evaluation(context.instance, key, current))

    return _check


def stale_partition_checks(assets: list[AssetsDefinition]) -> list:
    return [stale_partition_check(a) for a in assets if a.partitions_def is not None]


def stale_partitions_sensor(interval_seconds: int):
    @sensor(
        name="stale_partitions_sensor",
        minimum_interval_seconds=interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description=f"Reports {STALE_CHECK} on every partitioned asset whenever its answer changes (Dagster marks no partition stale).",
    )
    def _sensor(context: SensorEvaluationContext):
        graph = context.repository_def.asset_graph
        reported = json.loads(context.cursor) if context.cursor else {}
        now, events = {}, []
        for key in graph.get_all_asset_keys():
            node = graph.get(key)
            if node.partitions_def is None or AssetCheckKey(key, STALE_CHECK) not in node.check_keys:
                continue
            evaluation = _evaluation(context.instance, key, node.code_version)
            name = key.to_user_string()
            now[name] = [node.code_version, sorted(evaluation["metadata"]["stale_partitions"].value)]
            if reported.get(name) != now[name]:
                events.append(AssetCheckEvaluation(asset_key=key, check_name=STALE_CHECK, **evaluation))
        if not events:
            return SkipReason("no change in any partitioned asset's stale partitions")
        return SensorResult(asset_events=events, cursor=json.dumps(now, sort_keys=True))

    return _sensor
