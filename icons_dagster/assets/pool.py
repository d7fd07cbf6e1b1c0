"""training_pool and warmup_subset."""


from dagster import AssetExecutionContext, Output, asset

from icons_dagster.assets._context import GROUP, output
from icons_dagster.core.stages.icons import stage_pool, stage_warmup_subset
from icons_dagster.resources import DataResource, StoreResource, WarmupResource
from icons_dagster.core.storage.refs import PoolRef


@asset(group_name=GROUP, io_manager_key="refs_io_manager")
def training_pool(context: AssetExecutionContext, store: StoreResource, data: DataResource) -> Output:
    """Validated manifest of the pool (Parquet): ids, images, turns, content hash, shard; skips listed."""
    paths = data.config()
    return output(context, stage_pool(store.store(), paths.pool_path(), paths.image_root_path(), paths.num_shards, context.log.info, paths.max_image_pixels))


@asset(group_name=GROUP, io_manager_key="refs_io_manager")
def warmup_subset(context: AssetExecutionContext, store: StoreResource, warmup: WarmupResource, training_pool: PoolRef) -> Output:
    """The seeded random r% of the pool the warm-up trains on."""
    return output(context, stage_warmup_subset(store.store(), training_pool, warmup.config()))
