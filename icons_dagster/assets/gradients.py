"""training_gradients (per shard) and validation_gradients (per benchmark)."""


from collections.abc import Iterator

from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MetadataValue, asset

from icons_dagster.assets._context import EAGER, GROUP, ONE_RUN_PER_BACKFILL, partition_outputs, throttled_progress
from icons_dagster.core.stages.checks import check_features
from icons_dagster.core.stages.icons import stage_train_shard, stage_validation
from icons_dagster.core.stages.kit import StageResult
from icons_dagster.core.storage.artifacts import ArtifactStore

FEATURE_CHECK = "features_finite_unit_norm"


def _with_check(context: AssetExecutionContext, artifacts: ArtifactStore, results: dict[str, StageResult], num_checkpoints: int):
    """The run's partitions, then one feature check over all of them (per partition in its metadata)."""
    yield partition_outputs(context, results)
    checked = {key: check_features(artifacts, result.ref, num_checkpoints) for key, result in results.items()}
    passed = all(ok for ok, _ in checked.values())
    if len(checked) == 1:
        metadata = next(iter(checked.values()))[1]
    else:
        metadata = {key: MetadataValue.json({"passed": ok, **details}) for key, (ok, details) in checked.items()}
    yield AssetCheckResult(check_name=FEATURE_CHECK, passed=passed, metadata=metadata)
from icons_dagster.partitions import benchmark_partitions, train_shard_partitions
from icons_dagster.resources import DataResource, GradientsResource, ModelResource, StoreResource
from icons_dagster.core.storage.refs import CheckpointRef, PoolRef


@asset(
    group_name=GROUP,
    io_manager_key="refs_io_manager",
    partitions_def=train_shard_partitions,
    check_specs=[AssetCheckSpec(FEATURE_CHECK, asset="training_gradients")],
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
    yield from _with_check(context, artifacts, {context.partition_key: result}, len(warmup_checkpoint.checkpoints))


@asset(
    group_name=GROUP,
    io_manager_key="refs_io_manager",
    partitions_def=benchmark_partitions,
    backfill_policy=ONE_RUN_PER_BACKFILL,
    check_specs=[AssetCheckSpec(FEATURE_CHECK, asset="validation_gradients")],
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
    yield from _with_check(context, artifacts, results, len(warmup_checkpoint.checkpoints))
