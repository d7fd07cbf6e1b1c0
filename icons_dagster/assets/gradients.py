"""training_gradients (per shard) and validation_gradients (per benchmark)."""


from collections.abc import Iterator
from functools import partial

from dagster import AssetExecutionContext, asset

from icons_dagster.assets._context import EAGER, GROUP, ONE_RUN_PER_BACKFILL, check_spec, checked_partitions, throttled_progress
from icons_dagster.core.stages.checks import check_features
from icons_dagster.core.stages.icons import stage_train_shard, stage_validation

from icons_dagster.partitions import benchmark_partitions, train_shard_partitions
from icons_dagster.resources import DataResource, GradientsResource, ModelResource, StoreResource
from icons_dagster.core.storage.refs import CheckpointRef, PoolRef

FEATURE_CHECK = "features_finite_unit_norm"


@asset(
    kinds={"pytorch", "numpy", "parquet"},
    group_name=GROUP,
    io_manager_key="refs_io_manager",
    partitions_def=train_shard_partitions,
    check_specs=[check_spec(FEATURE_CHECK, "training_gradients")],
)
def training_gradients(
    context: AssetExecutionContext,
    store: StoreResource,
    data: DataResource,
    model: ModelResource,
    gradients: GradientsResource,
    training_pool: PoolRef,
    warmup_checkpoint: CheckpointRef,
) -> Iterator:
    """Projected, normalized float16 gradient features of one shard of the pool, per checkpoint."""
    artifacts = store.store()
    result = stage_train_shard(
        artifacts,
        context.partition_key,
        training_pool,
        warmup_checkpoint,
        model.config(),
        gradients.config(),
        log=context.log.info,
        progress=throttled_progress(context, f"training_gradients[{context.partition_key}]"),
        image_root=data.config().image_root_path(),
    )
    verify = partial(check_features, artifacts, num_checkpoints=len(warmup_checkpoint.checkpoints))
    yield from checked_partitions(context, {context.partition_key: result}, FEATURE_CHECK, verify)


@asset(
    kinds={"pytorch", "numpy", "parquet"},
    group_name=GROUP,
    io_manager_key="refs_io_manager",
    partitions_def=benchmark_partitions,
    backfill_policy=ONE_RUN_PER_BACKFILL,
    check_specs=[check_spec(FEATURE_CHECK, "validation_gradients")],
    automation_condition=EAGER,
)
def validation_gradients(
    context: AssetExecutionContext,
    store: StoreResource,
    data: DataResource,
    model: ModelResource,
    gradients: GradientsResource,
    warmup_checkpoint: CheckpointRef,
) -> Iterator:
    """SGD gradient features of each benchmark's validation set in the run, same projector as
    training (one model load for all of them)."""
    artifacts = store.store()
    paths, checkpoint, features = data.config(), model.config(), gradients.config()
    results = {
        benchmark: stage_validation(
            artifacts,
            benchmark,
            paths.benchmarks_path(),
            paths.image_root_path(),
            warmup_checkpoint,
            checkpoint,
            features,
            log=context.log.info,
            progress=throttled_progress(context, f"validation_gradients[{benchmark}]"),
            max_image_pixels=paths.max_image_pixels,
        )
        for benchmark in context.partition_keys
    }
    verify = partial(check_features, artifacts, num_checkpoints=len(warmup_checkpoint.checkpoints))
    yield from checked_partitions(context, results, FEATURE_CHECK, verify)
