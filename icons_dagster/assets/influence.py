"""task_influence: per benchmark, each training sample's mean cosine to its validation set."""


from collections.abc import Iterator

from dagster import AllPartitionMapping, AssetExecutionContext, AssetIn, asset

from icons_dagster.assets._context import EAGER, GROUP, ONE_RUN_PER_BACKFILL, check_spec, checked_partitions
from icons_dagster.core.stages.checks import check_influence, pool_ids
from icons_dagster.core.stages.icons import stage_influences
from icons_dagster.partitions import benchmark_partitions
from icons_dagster.resources import InfluenceResource, SelectionResource, StoreResource
from icons_dagster.resources.refs import ALL_PARTITIONS
from icons_dagster.core.storage.refs import CheckpointRef, PoolRef


@asset(
    kinds={"parquet"},
    group_name=GROUP,
    io_manager_key="refs_io_manager",
    partitions_def=benchmark_partitions,
    backfill_policy=ONE_RUN_PER_BACKFILL,
    automation_condition=EAGER,
    check_specs=[check_spec("influence_finite_valid_ids", "task_influence")],
    ins={
        "training_gradients": AssetIn(partition_mapping=AllPartitionMapping(), metadata=ALL_PARTITIONS),
        "validation_gradients": AssetIn(metadata=ALL_PARTITIONS),
    },
)
def task_influence(
    context: AssetExecutionContext,
    store: StoreResource,
    influence: InfluenceResource,
    selection: SelectionResource,
    training_pool: PoolRef,
    warmup_checkpoint: CheckpointRef,
    training_gradients: dict,
    validation_gradients: dict,
) -> Iterator:
    """Paper eq. 3 for every benchmark in the run in one streaming pass over the training
    features: each sample's inner product with each benchmark's mean validation feature."""
    artifacts = store.store()
    results = stage_influences(
        artifacts,
        training_pool,
        warmup_checkpoint,
        training_gradients,
        validation_gradients,
        selection.config().p,
        write_full_matrix=influence.config().write_matrix,
        log=context.log.info,
    )
    valid = pool_ids(artifacts, training_pool)
    yield from checked_partitions(context, results, "influence_finite_valid_ids", lambda ref: check_influence(artifacts, ref, valid))
