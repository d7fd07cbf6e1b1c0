"""The ``evaluation`` group: every method's subset, a fine-tune on each, scores, the Rel. table,
and each pool record's visual dependency (for the analysis of what a subset holds)."""


from collections.abc import Iterator
from dataclasses import replace

from dagster import AssetExecutionContext, AssetIn, asset

from icons_dagster.assets._context import output, throttled_progress
from icons_dagster.core.stages.evaluation import (
    stage_benchmark_scores,
    stage_evaluation_subsets,
    stage_evaluation_table,
    stage_finetune,
)
from icons_dagster.core.stages.visual_dependency import stage_visual_dependency
from icons_dagster.partitions import evaluation_method_partitions
from icons_dagster.resources import (
    DataResource,
    EvaluationResource,
    GradientsResource,
    LoraResource,
    ModelResource,
    SelectionResource,
    StoreResource,
)
from icons_dagster.resources.refs import MATERIALIZED_PARTITIONS
from icons_dagster.core.storage.refs import (
    AdapterRef, CheckpointRef, EvaluationSubsetsRef, OFASubsetRef, PoolRef, PseudoLabelsRef, SubsetRef, VisualDependencyRef, VoteTableRef,
)  # fmt: skip

EVALUATION_GROUP = "evaluation"


@asset(kinds={"parquet"}, group_name=EVALUATION_GROUP, io_manager_key="refs_io_manager")
def evaluation_subsets(
    context: AssetExecutionContext,
    store: StoreResource,
    data: DataResource,
    selection: SelectionResource,
    evaluation: EvaluationResource,
    training_pool: PoolRef,
    vote_table: VoteTableRef,
    selected_subset: SubsetRef,
    ofa_selected_subset: OFASubsetRef,
    ofa_pseudo_labels: PseudoLabelsRef,
) -> Iterator:
    """The ids each compared method trains on: full, the random seeds, the exported ICONS subset,
    the paper's vote and its variants, direct-merge, the TF-IDF vote, OFA, the specialists."""
    paths, config = data.config(), evaluation.config()
    config = replace(config, methods=config.partition_methods())  # partitions only, in their order
    exported = {"icons": selected_subset, "ofa": ofa_selected_subset}
    yield output(
        context,
        stage_evaluation_subsets(
            store.store(), training_pool, vote_table, exported, config, selection.config().p, paths.benchmarks_path(), paths.image_root_path(),
            clusters_ref=ofa_pseudo_labels, max_image_pixels=paths.max_image_pixels,
        )  # fmt: skip
    )


@asset(kinds={"pytorch", "safetensors"}, group_name=EVALUATION_GROUP, io_manager_key="refs_io_manager", partitions_def=evaluation_method_partitions)
def finetuned_adapter(
    context: AssetExecutionContext,
    store: StoreResource,
    data: DataResource,
    model: ModelResource,
    lora: LoraResource,
    evaluation: EvaluationResource,
    training_pool: PoolRef,
    evaluation_subsets: EvaluationSubsetsRef,
) -> Iterator:
    """The base model + a LoRA trained on one method's subset with the shared recipe."""
    config = evaluation.config()
    result = stage_finetune(
        store.store(),
        context.partition_key,
        training_pool,
        evaluation_subsets,
        model.config(),
        config.lora_for(lora.config()),
        config,
        log=context.log.info,
        progress=throttled_progress(context, f"finetuned_adapter[{context.partition_key}]"),
        image_root=data.config().image_root_path(),
    )
    yield output(context, result)


@asset(kinds={"pytorch", "parquet"}, group_name=EVALUATION_GROUP, io_manager_key="refs_io_manager", partitions_def=evaluation_method_partitions)
def benchmark_scores(
    context: AssetExecutionContext,
    store: StoreResource,
    data: DataResource,
    model: ModelResource,
    evaluation: EvaluationResource,
    finetuned_adapter: AdapterRef,
) -> Iterator:
    """Every benchmark's test split scored with the metric that fits its answers."""
    paths = data.config()
    result = stage_benchmark_scores(
        store.store(),
        context.partition_key,
        finetuned_adapter,
        paths.benchmarks_path(),
        paths.image_root_path(),
        model.config(),
        evaluation.config(),
        log=context.log.info,
        max_image_pixels=paths.max_image_pixels,
    )
    yield output(context, result)


@asset(kinds={"parquet", "markdown"}, group_name=EVALUATION_GROUP, io_manager_key="refs_io_manager", ins={"benchmark_scores": AssetIn(metadata=MATERIALIZED_PARTITIONS)})
def evaluation_table(
    context: AssetExecutionContext,
    store: StoreResource,
    evaluation: EvaluationResource,
    benchmark_scores: dict,
    evaluation_subsets: EvaluationSubsetsRef,
    training_pool: PoolRef,
    visual_dependency: VisualDependencyRef,
) -> Iterator:
    """Paper Table 1's shape: a row per configured method, a column per benchmark, Rel. (eq. 2),
    each method's Rel. difference to random with its paired bootstrap 95% interval, and what
    each subset holds (sources, wrong answers, mean Visual Dependency Score)."""
    config = evaluation.config()
    methods = config.partition_methods()
    missing = [m for m in methods if m not in benchmark_scores]
    if missing:
        raise ValueError(f"benchmark_scores has not been materialized for {missing}: materialize those partitions first")
    scores = {m: benchmark_scores[m] for m in methods}
    result = stage_evaluation_table(store.store(), scores, evaluation_subsets, config, training_pool, visual_dependency)
    yield output(context, result)


@asset(kinds={"pytorch", "parquet"}, group_name=EVALUATION_GROUP, io_manager_key="refs_io_manager")
def visual_dependency(
    context: AssetExecutionContext,
    store: StoreResource,
    data: DataResource,
    model: ModelResource,
    gradients: GradientsResource,
    training_pool: PoolRef,
    warmup_checkpoint: CheckpointRef,
) -> Iterator:
    """Per pool record: answer loss with a Gaussian-noise image minus with its own image, at the
    warm-up checkpoint (ICONS App. B.3, loss form); null for text-only records."""
    result = stage_visual_dependency(
        store.store(),
        training_pool,
        warmup_checkpoint,
        model.config(),
        gradients.config(),
        log=context.log.info,
        progress=throttled_progress(context, "visual_dependency"),
        image_root=data.config().image_root_path(),
    )
    yield output(context, result)


EVALUATION_ASSETS = [visual_dependency, evaluation_subsets, finetuned_adapter, benchmark_scores, evaluation_table]
