"""What every asset does around its stage call: resources -> store, logging, metadata."""


import time
from collections.abc import Callable, Iterator
from typing import Any

from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, AutomationCondition, BackfillPolicy, DagsterEventType, DataVersion, MetadataValue, Output, TableColumn, TableSchema

from icons_dagster.core.data.pool import MANIFEST_FILE
from icons_dagster.core.features.extraction import SAMPLES_FILE
from icons_dagster.core.stages.checks import check_subset, check_subset_records, pool_ids, subset_ids
from icons_dagster.core.stages.evaluation import RECORD_SCORES_FILE, SUBSETS_FILE, TABLE_FILE
from icons_dagster.core.stages.icons import INFLUENCE_FILE, SUBSET_PARQUET, VOTE_TABLE_FILE
from icons_dagster.core.stages.ofa import IDS_FILE, LABELS_FILE
from icons_dagster.core.stages.visual_dependency import VDS_FILE
from icons_dagster.core.storage.fingerprint import fingerprint
from icons_dagster.core.stages.kit import StageResult
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.core.storage.npy import open_binary
from icons_dagster.core.storage.refs import PoolRef, Ref
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

# Each asset check's name and what it verifies (shown in the UI beside its result).
CHECKS = {
    "manifest_well_formed": "The manifest holds every valid record once (unique ids), each in one of the configured shards, at least one.",
    "checkpoint_finite": "Every saved tensor of every warm-up checkpoint (LoRA weights, Adam moments) is finite; the checkpoints' weights sum to 1.",
    "features_finite_unit_norm": "Every stored gradient feature is finite with norm 1 (within float16 rounding); per partition in the metadata.",
    "influence_finite_valid_ids": "Every influence score is finite; every id appears once and is a valid record of the pool (no rejected record).",
    "every_registered_benchmark_voted": "The vote covers exactly the registered benchmarks.",
    "subset_size": "The exported subset parses and holds exactly floor(p N) distinct records.",
    "no_rejected_record": "Every record of the exported subset is a valid record of the pool: none the pool stage rejected.",
    "embeddings_finite_unit_norm": "Every stored embedding is finite with norm 1 (within float16 rounding).",
}

# The Parquet table each asset's metadata describes (``dagster/row_count``, ``dagster/column_schema``).
TABLES = {
    "training_pool": MANIFEST_FILE,
    "training_gradients": SAMPLES_FILE,
    "validation_gradients": SAMPLES_FILE,
    "task_influence": INFLUENCE_FILE,
    "vote_table": VOTE_TABLE_FILE,
    "selected_subset": SUBSET_PARQUET,
    "visual_dependency": VDS_FILE,
    "ofa_embeddings": IDS_FILE,
    "ofa_pseudo_labels": LABELS_FILE,
    "ofa_selected_subset": SUBSET_PARQUET,
    "evaluation_subsets": SUBSETS_FILE,
    "benchmark_scores": RECORD_SCORES_FILE,
    "evaluation_table": TABLE_FILE,
}


def table_metadata(context: AssetExecutionContext, result: StageResult) -> dict[str, Any]:
    """Row count and column schema of the asset's table, read from its Parquet footer (in a
    ranged read from the shared store when this machine has no copy)."""
    import pyarrow.parquet as pq

    table = TABLES.get(context.asset_key.to_user_string())
    if table is None:
        return {}
    if result.directory is not None:
        where = result.directory / table
    elif "remote_location" in result.metadata:
        where = f"{result.metadata['remote_location']}/{table}"
    else:
        return {}
    try:
        with open_binary(where) as f:
            footer = pq.read_metadata(f)
    except FileNotFoundError:
        return {}  # e.g. ofa_pseudo_labels holds no labels when the selector was imported
    columns = [TableColumn(field.name, str(field.type)) for field in footer.schema.to_arrow_schema()]
    return {"dagster/row_count": footer.num_rows, "dagster/column_schema": TableSchema(columns=columns)}


def check_spec(name: str, asset: str):
    """The check ``name`` on ``asset``, with its description."""
    return AssetCheckSpec(name, asset=asset, description=CHECKS[name])


SUBSET_CHECKS = ("subset_size", "no_rejected_record")


def subset_checks(artifacts: ArtifactStore, subset: Ref, n_pool: int, p: float, pool: PoolRef) -> Iterator[AssetCheckResult]:
    """The SUBSET_CHECKS of an exported subset, from one parse of its JSON."""
    ids = subset_ids(artifacts, subset)
    passed, metadata = check_subset(ids, n_pool, p)
    yield AssetCheckResult(check_name="subset_size", passed=passed, metadata=metadata)
    passed, metadata = check_subset_records(ids, pool_ids(artifacts, pool))
    yield AssetCheckResult(check_name="no_rejected_record", passed=passed, metadata=metadata)


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
    artifact's folder, or its URL on the shared store when this machine has no copy) and ``export_<kind>`` (what the stage exported)."""
    metadata: dict[str, Any] = {}
    for key, value in result.metadata.items():
        if key == "remote_location":
            continue  # the path below
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
    where = str(result.directory) if result.directory is not None else result.metadata.get("remote_location", result.ref.path)
    metadata["path"] = MetadataValue.path(where)
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
    metadata = {**to_metadata(result), **table_metadata(context, result), "seconds": step_seconds(context)}
    return Output(result.ref, metadata=metadata, data_version=DataVersion(result.ref.fingerprint))


def partition_outputs(context: AssetExecutionContext, results: dict[str, StageResult]) -> Output:
    """The references of every partition in the run, each with its own metadata.

    Dagster stamps one data version on all partitions of an output: the artifact's
    fingerprint when the run has one partition, a fingerprint of all of them otherwise.
    """
    seconds = step_seconds(context)  # the step's, shared by its partitions
    for key, result in results.items():
        context.add_asset_metadata({**to_metadata(result), **table_metadata(context, result), "seconds": seconds}, partition_key=key)
    fingerprints = {key: result.ref.fingerprint for key, result in results.items()}
    version = next(iter(fingerprints.values())) if len(fingerprints) == 1 else fingerprint("partitions", refs=fingerprints)
    return Output(PartitionRefs({key: result.ref for key, result in results.items()}), data_version=DataVersion(version))


def checked_partitions(context: AssetExecutionContext, results: dict[str, StageResult], check: str, verify: Callable[[Ref], tuple[bool, dict]]):
    """The run's partitions, then one check over all of them (each partition's result in its metadata)."""
    yield partition_outputs(context, results)
    checked = {key: verify(result.ref) for key, result in results.items()}
    passed = all(ok for ok, _ in checked.values())
    if len(checked) == 1:
        metadata = next(iter(checked.values()))[1]
    else:
        metadata = {key: MetadataValue.json({"passed": ok, **details}) for key, (ok, details) in checked.items()}
    yield AssetCheckResult(check_name=check, passed=passed, metadata=metadata)
