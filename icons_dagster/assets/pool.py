"""training_pool and warmup_subset."""


from collections.abc import Iterator

from dagster import AssetCheckResult, AssetExecutionContext, Output, asset

from icons_dagster.assets._context import GROUP, check_spec, output
from icons_dagster.core.stages.checks import check_pool
from icons_dagster.core.stages.icons import stage_pool, stage_warmup_subset
from icons_dagster.resources import DataResource, StoreResource, WarmupResource
from icons_dagster.core.storage.refs import PoolRef


@asset(kinds={"parquet"}, group_name=GROUP, io_manager_key="refs_io_manager", check_specs=[check_spec("manifest_well_formed", "training_pool")])
def training_pool(context: AssetExecutionContext, store: StoreResource, data: DataResource) -> Iterator:
    """Validated manifest of the pool (Parquet): ids, images, turns, content hash, shard; skips listed."""
    paths = data.config()
    artifacts = store.store()
    result = stage_pool(artifacts, paths.pool_path(), paths.image_root_path(), paths.num_shards, context.log.info, paths.max_image_pixels)
    yield output(context, result)
    passed, metadata = check_pool(artifacts, result.ref)
    yield AssetCheckResult(check_name="manifest_well_formed", passed=passed, metadata=metadata)


@asset(kinds={"parquet"}, group_name=GROUP, io_manager_key="refs_io_manager")
def warmup_subset(context: AssetExecutionContext, store: StoreResource, warmup: WarmupResource, training_pool: PoolRef) -> Output:
    """The seeded random r% of the pool the warm-up trains on."""
    return output(context, stage_warmup_subset(store.store(), training_pool, warmup.config()))
