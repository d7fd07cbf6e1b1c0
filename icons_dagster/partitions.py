"""Partitions: benchmarks (dynamic, registered from the benchmarks folder) and training
shards (static, fixed by configuration so they exist before anything is materialized)."""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition, StaticPartitionsDefinition

from icons_dagster.core.evaluation_pipeline import DEFAULT_METHODS
from icons_dagster.core.pool import shard_keys
from icons_dagster.resources.home import num_shards_from_environment

BENCHMARKS_PARTITION_NAME = "benchmarks"

benchmark_partitions = DynamicPartitionsDefinition(name=BENCHMARKS_PARTITION_NAME)
train_shard_partitions = StaticPartitionsDefinition(shard_keys(num_shards_from_environment()))

# One partition per compared selection method (fine-tune + scores each).
evaluation_method_partitions = StaticPartitionsDefinition(list(DEFAULT_METHODS))
