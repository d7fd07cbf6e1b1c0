"""Partitions: benchmarks (dynamic, registered from the benchmarks folder), training shards
(static, as many as ``data.num_shards`` says, so they exist before anything is
materialized) and evaluation methods."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dagster import DynamicPartitionsDefinition, StaticPartitionsDefinition

from icons_dagster.core.config import DataConfig
from icons_dagster.core.evaluation.methods import DEFAULT_METHODS
from icons_dagster.core.data.pool import shard_keys

BENCHMARKS_PARTITION_NAME = "benchmarks"
# Dagster's run tags for a run over a partition range (as its backfills set them)
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"

benchmark_partitions = DynamicPartitionsDefinition(name=BENCHMARKS_PARTITION_NAME)


def shard_partitions(num_shards: int) -> StaticPartitionsDefinition:
    """The training shards ``sha256(id) mod num_shards``."""
    return StaticPartitionsDefinition(shard_keys(num_shards))


# The shard assets are declared with the default count; ``definitions.with_shards`` gives
# every shard-partitioned asset and job the configured one.
train_shard_partitions = shard_partitions(DataConfig().num_shards)

# One partition per compared selection method (fine-tune + scores each).
evaluation_method_partitions = StaticPartitionsDefinition(list(DEFAULT_METHODS))


def contiguous_ranges(ordered: Sequence[str], wanted: Iterable[str]) -> list[tuple[str, str]]:
    """``(first, last)`` of each unbroken run of ``wanted`` in the partitions' order.

    A Dagster run covers a partition range, so benchmarks to materialize together become
    one run per such range (usually one: new benchmarks are registered at the end).
    """
    wanted = set(wanted)
    unknown = sorted(wanted - set(ordered))
    if unknown:
        raise ValueError(f"not registered as partitions: {unknown}")
    ranges: list[tuple[str, str]] = []
    start = None
    for i, key in enumerate(ordered):
        if key in wanted and start is None:
            start = key
        if start is not None and (i + 1 == len(ordered) or ordered[i + 1] not in wanted):
            ranges.append((start, key))
            start = None
    return ranges


def partition_range_tags(first: str, last: str) -> dict[str, str]:
    """The run tags of a run over the partitions first..last (what a single-run backfill sets)."""
    return {PARTITION_RANGE_START_TAG: first, PARTITION_RANGE_END_TAG: last}
