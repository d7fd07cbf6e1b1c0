"""Benchmarks arrive by folder: the sensor registers them, declarative automation does the rest.

The sensor only changes the benchmark partitions (new valid folder -> added; folder gone
-> retired, its artifacts kept) and, on a retirement, asks for the vote again. Eager
automation conditions on validation_gradients, task_influence, vote_table and
selected_subset then compute exactly the new benchmark's features and influence and redo
the vote; several new benchmarks arriving together are batched into one vote. Training
gradients are never part of it.
"""

from dagster import (
    AssetKey,
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    sensor,
)

from icons_dagster.assets import GROUP
from icons_dagster.core.config import AutomationConfig
from icons_dagster.core.data.benchmarks import scan_benchmarks
from icons_dagster.partitions import BENCHMARKS_PARTITION_NAME, benchmark_partitions
from icons_dagster.resources import DataResource

SELECTION_ASSETS = [AssetKey("vote_table"), AssetKey("selected_subset")]

vote_job = define_asset_job("vote_job", selection=AssetSelection.assets(*SELECTION_ASSETS), description="Redo the vote and the subset.")


def register_benchmark_folders(context: SensorEvaluationContext, data: DataResource):
    """New valid folders -> partitions (the tick's message names them); gone -> retired, and the vote again."""
    paths = data.config()
    registered = context.instance.get_dynamic_partitions(BENCHMARKS_PARTITION_NAME)
    scan = scan_benchmarks(paths.benchmarks_path(), paths.image_root_path(), registered)
    for name, reason in scan.invalid.items():
        context.log.warning(f"benchmark folder {name!r} not registered: {reason}")
    skipped = "; ".join(f"{name}: {reason}" for name, reason in scan.invalid.items())
    invalid = f"; invalid: {skipped}" if skipped else ""
    requests = []
    if scan.new:
        context.log.info(f"registering benchmarks: {scan.new}")
        requests.append(benchmark_partitions.build_add_request(scan.new))
    run_requests = []
    if scan.removed:
        context.log.info(f"retiring benchmarks whose folder is gone (artifacts kept): {scan.removed}")
        requests.append(benchmark_partitions.build_delete_request(scan.removed))
        run_requests.append(RunRequest(asset_selection=SELECTION_ASSETS, run_key=f"retire:{','.join(scan.removed)}"))
    if not requests:
        return SkipReason(f"no benchmark added or removed{invalid}")
    # A tick that only adds partitions is recorded as skipped: its message says what it registered.
    message = None if run_requests else f"registered benchmarks {scan.new}: icons_automation_sensor computes their features and influence, then the vote{invalid}"
    return SensorResult(dynamic_partitions_requests=requests, run_requests=run_requests, skip_reason=message)


def benchmark_folder_sensor(interval_seconds: int = AutomationConfig().sensor_interval_seconds):
    return sensor(
        name="benchmark_folder_sensor",
        minimum_interval_seconds=interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Registers new benchmark folders as partitions and retires removed ones.",
    )(register_benchmark_folders)


def icons_automation_sensor(interval_seconds: int = AutomationConfig().sensor_interval_seconds) -> AutomationConditionSensorDefinition:
    return AutomationConditionSensorDefinition(
        "icons_automation_sensor",
        target=AssetSelection.groups(GROUP),
        default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=interval_seconds,
        description="Evaluates the eager conditions: new benchmarks' features and influence, then one vote.",
    )


def vote_schedule(cron: str) -> ScheduleDefinition:
    """Periodic rerun of the vote and the subset (stopped until a user starts it)."""
    return ScheduleDefinition(
        name="vote_schedule", cron_schedule=cron, job=vote_job, default_status=DefaultScheduleStatus.STOPPED
    )
