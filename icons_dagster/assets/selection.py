"""vote_table and selected_subset: the consensus over every registered benchmark."""


from collections.abc import Iterator

from dagster import AssetCheckResult, AssetExecutionContext, AssetIn, asset

from icons_dagster.assets._context import EAGER, GROUP, SELECTION_POOL, SUBSET_CHECKS, check_spec, output, subset_checks
from icons_dagster.core.stages.icons import stage_selected_subset, stage_vote_table
from icons_dagster.partitions import BENCHMARKS_PARTITION_NAME
from icons_dagster.resources import GradientsResource, SelectionResource, StoreResource
from icons_dagster.resources.refs import ALL_PARTITIONS
from icons_dagster.core.storage.refs import CheckpointRef, PoolRef, VoteTableRef


@asset(
    kinds={"parquet"},
    group_name=GROUP,
    io_manager_key="refs_io_manager",
    ins={"task_influence": AssetIn(metadata=ALL_PARTITIONS)},
    automation_condition=EAGER,
    pool=SELECTION_POOL,
    check_specs=[check_spec("every_registered_benchmark_voted", "vote_table")],
)
def vote_table(context: AssetExecutionContext, store: StoreResource, selection: SelectionResource, task_influence: dict) -> Iterator:
    """Per benchmark the (1-p) threshold and votes, the vote sum (eq. 4) and Table 6's aggregations."""
    result = stage_vote_table(store.store(), task_influence, selection.config())
    yield output(context, result)
    registered = sorted(context.instance.get_dynamic_partitions(BENCHMARKS_PARTITION_NAME))
    voted = sorted(result.ref.benchmarks)
    yield AssetCheckResult(
        check_name="every_registered_benchmark_voted",
        passed=registered == voted,
        metadata={"registered": registered, "voted": voted},
    )


@asset(
    kinds={"parquet", "json"},
    group_name=GROUP,
    io_manager_key="refs_io_manager",
    check_specs=[check_spec(name, "selected_subset") for name in SUBSET_CHECKS],
    automation_condition=EAGER,
    pool=SELECTION_POOL,
)
def selected_subset(
    context: AssetExecutionContext,
    store: StoreResource,
    gradients: GradientsResource,
    selection: SelectionResource,
    training_pool: PoolRef,
    warmup_checkpoint: CheckpointRef,
    vote_table: VoteTableRef,
) -> Iterator:
    """The top floor(pN) by votes (after each benchmark's coverage reserve) with the documented
    tie-break, as LLaVA JSON + Parquet."""
    artifacts, config = store.store(), selection.config()
    lineage = {
        "pool": training_pool.fingerprint,
        "pool_source": training_pool.source,
        "checkpoint": warmup_checkpoint.fingerprint,
        "checkpoints": warmup_checkpoint.checkpoints,
        "model": warmup_checkpoint.model,
        "vote_table": vote_table.fingerprint,
        "benchmarks": vote_table.benchmarks,
        "task_influence": vote_table.influence,
        "benchmark_content_sha256": vote_table.benchmark_content_sha256,
        "gradients": gradients.config().__dict__,
        "selection": {"p": config.p, "aggregation": config.method, "task_weights": dict(config.task_weights)},
    }
    result = stage_selected_subset(artifacts, training_pool, vote_table, config, lineage)
    yield output(context, result)
    yield from subset_checks(artifacts, result.ref, training_pool.n_records, config.p, training_pool)
