"""task_influence: per benchmark, each training sample's mean cosine to its validation set."""


from dagster import AllPartitionMapping, AssetIn, Output, asset

from icons_dagster.assets._context import EAGER, GROUP, output
from icons_dagster.core.pipeline import stage_influence
from icons_dagster.partitions import benchmark_partitions
from icons_dagster.resources import SettingsResource, StoreResource
from icons_dagster.resources.refs import ALL_PARTITIONS


@asset(
    group_name=GROUP,
    io_manager_key="refs_io_manager",
    partitions_def=benchmark_partitions,
    automation_condition=EAGER,
    ins={"training_gradients": AssetIn(partition_mapping=AllPartitionMapping(), metadata=ALL_PARTITIONS)},
)
def task_influence(
    context,
    store: StoreResource,
    settings: SettingsResource,
    training_pool: dict,
    warmup_checkpoint: dict,
    training_gradients: dict,
    validation_gradients: dict,
) -> Output:
    """Paper eq. 3 as one streaming pass: inner product with the mean validation feature."""
    result = stage_influence(
        store.store(),
        context.partition_key,
        training_pool,
        warmup_checkpoint,
        training_gradients,
        validation_gradients,
        settings.selection().p,
        write_full_matrix=settings.write_influence_matrix,
    )
    return output(result)
