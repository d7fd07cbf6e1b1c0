"""What every asset does around its stage call: resources -> store, logging, metadata."""


import time
from typing import Any

from dagster import AssetExecutionContext, AutomationCondition, BackfillPolicy, DagsterEventType, DataVersion, MetadataValue, Output

from icons_dagster.core.storage.fingerprint import fingerprint
from icons_dagster.core.stages.kit import StageResult
from icons_dagster.resources.refs import PartitionRefs

GROUP = "icons"
# vote_table and selected_subset claim this pool (limit 1 in the instance's dagster.yaml),
# so runs that write the vote or the subset never race each other.
SELECTION_POOL = "icons_selection"
# New benchmarks' features and influence, then the vote, run by themselves: Dagster's eager(),
# which acts only on partitions that become missing after its first evaluation, and also on those
# already missing then (a benchmark registered before the daemon's first automation tick). That
# term sits outside since_last_handled(), whose reset includes the first evaluation itself.
EAGER = (
    (
        (AutomationCondition.newly_missing() | AutomationCondition.any_deps_updated()).since_last_handled()
        | (AutomationCondition.missing() & AutomationCondition.initial_evaluation())
    )
    & ~AutomationCondition.any_deps_missing()
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
).with_label("eager, and missing at the first evaluation")
# Benchmark-partitioned assets take every requested benchmark in one run (a backfill from
# the UI, several new folders in one automation tick, the CLI): the model loads once and
# the training features are read once for all of them, not once per benchmark.
ONE_RUN_PER_BACKFILL = BackfillPolicy.single_run()


def throttled_progress(context: AssetExecutionContext, label: str, every_seconds: float = 10.0):
    """A progress callback that logs to Dagster at most every ``every_seconds``."""
    last = [0.0]

    def report(done: int, total: int, *extra: Any) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= every_seconds:
            last[0] = now
            suffix = f" loss={extra[0]:.4f}" if extra and extra[0] == extra[0] else ""
            context.log.info(f"{label}: {done}/{total}{suffix}")

    return report


def to_metadata(result: StageResult) -> dict[str, Any]:
    """Stage metadata -> Dagster metadata values (plots as markdown, tables as markdown). Paths
    are absolute, under the home as it is now, so a user can open or copy them: ``path`` (the
    artifact's folder) and ``export_<kind>`` (what the stage exported)."""
    metadata: dict[str, Any] = {}
    for key, value in result.metadata.items():
        if key == "plots":
            for name, markdown in value.items():
                metadata[f"plot_{name}"] = MetadataValue.md(markdown)
        elif key == "exports":
            for kind, path in value.items():
                metadata[f"export_{kind}"] = MetadataValue.path(path)
        elif key in ("top_samples", "table"):
            metadata[key] = MetadataValue.md(value)
        elif isinstance(value, (dict, list)):
            metadata[key] = MetadataValue.json(value)
        elif value is None:
            metadata[key] = MetadataValue.text("none")
        else:
            metadata[key] = value
    metadata["path"] = MetadataValue.path(str(result.directory) if result.directory is not None else result.ref.path)
    return metadata


def step_seconds(context: AssetExecutionContext) -> float | None:
    """Wall seconds since this step started (its STEP_START event): everything it did in this
    run, the reuse check, the hashing of its inputs and its model loads included."""
    step = context.get_step_execution_context().step.key
    records = context.instance.get_records_for_run(context.run_id, of_type=DagsterEventType.STEP_START).records
    starts = [r.event_log_entry.timestamp for r in records if r.event_log_entry.step_key == step]
    return round(time.time() - max(starts), 3) if starts else None


def output(context: AssetExecutionContext, result: StageResult) -> Output:
    """The reference as the asset's value; its fingerprint as the data version; ``seconds``
    this step's wall time (``compute_seconds``: what building the artifact took, then)."""
    return Output(result.ref, metadata={**to_metadata(result), "seconds": step_seconds(context)}, data_version=DataVersion(result.ref.fingerprint))


def partition_outputs(context: AssetExecutionContext, results: dict[str, StageResult]) -> Output:
    """The references of every partition in the run, each with its own metadata.

    Dagster stamps one data version on all partitions of an output: the artifact's
    fingerprint when the run has one partition, a fingerprint of all of them otherwise.
    """
    seconds = step_seconds(context)  # the step's, shared by its partitions
    for key, result in results.items():
        context.add_asset_metadata({**to_metadata(result), "seconds": seconds}, partition_key=key)
    fingerprints = {key: result.ref.fingerprint for key, result in results.items()}
    version = next(iter(fingerprints.values())) if len(fingerprints) == 1 else fingerprint("partitions", refs=fingerprints)
    return Output(PartitionRefs({key: result.ref for key, result in results.items()}), data_version=DataVersion(version))
