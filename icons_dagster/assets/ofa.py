"""The ``ofa`` group: embeddings per shard, k-means pseudo labels, the selector, its subset."""


from collections.abc import Iterator

from dagster import AssetCheckResult, AssetExecutionContext, AssetIn, asset

from icons_dagster.assets._context import SUBSET_CHECKS, check_spec, output, subset_checks, throttled_progress
from icons_dagster.core.stages.ofa import (
    EMBEDDINGS_FILE,
    stage_ofa_embeddings,
    stage_ofa_pseudo_labels,
    stage_ofa_selected_subset,
    stage_ofa_selector,
)
from icons_dagster.core.stages.checks import check_unit_rows
from icons_dagster.partitions import train_shard_partitions
from icons_dagster.resources import DataResource, EmbedderResource, OFAResource, StoreResource
from icons_dagster.resources.refs import ALL_PARTITIONS
from icons_dagster.core.storage.refs import PoolRef, PseudoLabelsRef, SelectorRef

OFA_GROUP = "ofa"


@asset(
    kinds={"pytorch", "numpy", "parquet"},
    group_name=OFA_GROUP,
    io_manager_key="refs_io_manager",
    partitions_def=train_shard_partitions,
    check_specs=[check_spec("embeddings_finite_unit_norm", "ofa_embeddings")],
)
def ofa_embeddings(
    context: AssetExecutionContext, store: StoreResource, data: DataResource, embedder: EmbedderResource, training_pool: PoolRef
) -> Iterator:
    """One shard's records in the frozen image-text space (float16, unit norm)."""
    artifacts = store.store()
    result = stage_ofa_embeddings(
        artifacts,
        context.partition_key,
        training_pool,
        embedder.config(),
        log=context.log.info,
        progress=throttled_progress(context, f"ofa_embeddings[{context.partition_key}]"),
        image_root=data.config().image_root_path(),
    )
    yield output(context, result)
    passed, metadata = check_unit_rows([artifacts.absolute(result.ref.path) / EMBEDDINGS_FILE])
    yield AssetCheckResult(check_name="embeddings_finite_unit_norm", passed=passed, metadata=metadata)


@asset(kinds={"numpy", "parquet"}, group_name=OFA_GROUP, io_manager_key="refs_io_manager", ins={"ofa_embeddings": AssetIn(metadata=ALL_PARTITIONS)})
def ofa_pseudo_labels(context: AssetExecutionContext, store: StoreResource, ofa: OFAResource, training_pool: PoolRef, ofa_embeddings: dict) -> Iterator:
    """Seeded k-means over the whole pool: each record's cluster is its pseudo label."""
    config = ofa.config()
    result = stage_ofa_pseudo_labels(
        store.store(),
        training_pool,
        ofa_embeddings,
        config,
        config.selector_source(),
        log=context.log.info,
        progress=throttled_progress(context, "k-means iterations"),
    )
    yield output(context, result)


@asset(kinds={"pytorch", "safetensors"}, group_name=OFA_GROUP, io_manager_key="refs_io_manager", ins={"ofa_embeddings": AssetIn(metadata=ALL_PARTITIONS)})
def ofa_selector(
    context: AssetExecutionContext, store: StoreResource, ofa: OFAResource, embedder: EmbedderResource, ofa_embeddings: dict, ofa_pseudo_labels: PseudoLabelsRef
) -> Iterator:
    """The MLP that predicts pseudo labels (trained here, or imported from ``ofa.selector``)."""
    config = ofa.config()
    result = stage_ofa_selector(
        store.store(),
        ofa_embeddings,
        ofa_pseudo_labels,
        config,
        embedder.config(),
        config.selector_source(),
        log=context.log.info,
        progress=throttled_progress(context, "selector epochs"),
    )
    yield output(context, result)


@asset(
    kinds={"parquet", "json"},
    group_name=OFA_GROUP,
    io_manager_key="refs_io_manager",
    ins={"ofa_embeddings": AssetIn(metadata=ALL_PARTITIONS)},
    check_specs=[check_spec(name, "ofa_selected_subset") for name in SUBSET_CHECKS],
)
def ofa_selected_subset(context: AssetExecutionContext, store: StoreResource, ofa: OFAResource, training_pool: PoolRef, ofa_embeddings: dict, ofa_selector: SelectorRef) -> Iterator:
    """The least-confident floor(pN) records, as LLaVA JSON + Parquet confidences."""
    artifacts, config = store.store(), ofa.config()
    lineage = {
        "pool": training_pool.fingerprint,
        "pool_source": training_pool.source,
        "selector": ofa_selector.fingerprint,
        "selector_imported_from": ofa_selector.imported_from,
        "embedder": ofa_selector.embedder,
        "ofa": ofa.model_dump(),
    }
    result = stage_ofa_selected_subset(artifacts, training_pool, ofa_embeddings, ofa_selector, config, lineage)
    yield output(context, result)
    yield from subset_checks(artifacts, result.ref, result.metadata["n_pool"], config.p, training_pool)


OFA_ASSETS = [ofa_embeddings, ofa_pseudo_labels, ofa_selector, ofa_selected_subset]
