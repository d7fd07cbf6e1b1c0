"""warmup_checkpoint: LoRA warm-up, adapters + Adam moments + LR weights."""


from collections.abc import Iterator

from dagster import AssetCheckResult, AssetExecutionContext, asset

from icons_dagster.assets._context import GROUP, check_spec, output, throttled_progress
from icons_dagster.core.stages.checks import check_checkpoint
from icons_dagster.core.stages.icons import stage_warmup_checkpoint
from icons_dagster.resources import DataResource, LoraResource, ModelResource, StoreResource, WarmupResource
from icons_dagster.core.storage.refs import PoolRef, WarmupSubsetRef


@asset(kinds={"pytorch", "safetensors"}, group_name=GROUP, io_manager_key="refs_io_manager", check_specs=[check_spec("checkpoint_finite", "warmup_checkpoint")])
def warmup_checkpoint(
    context: AssetExecutionContext,
    store: StoreResource,
    data: DataResource,
    model: ModelResource,
    lora: LoraResource,
    warmup: WarmupResource,
    training_pool: PoolRef,
    warmup_subset: WarmupSubsetRef,
) -> Iterator:
    """LoRA warm-up on the warm-up subset; one or more checkpoints saved with save_pretrained."""
    result = stage_warmup_checkpoint(
        store.store(),
        training_pool,
        warmup_subset,
        model.config(),
        lora.config(),
        warmup.config(),
        log=context.log.info,
        progress=throttled_progress(context, "warm-up step"),
        image_root=data.config().image_root_path(),
    )
    yield output(context, result)
    passed, metadata = check_checkpoint(store.store(), result.ref)
    yield AssetCheckResult(check_name="checkpoint_finite", passed=passed, metadata=metadata)
