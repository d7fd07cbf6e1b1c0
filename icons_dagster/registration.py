"""Registering benchmark partitions from the benchmarks folder (CLI and a UI job)."""


from dagster import DagsterInstance, OpExecutionContext, job, op

from icons_dagster.core.records import find_benchmarks
from icons_dagster.partitions import BENCHMARKS_PARTITION_NAME
from icons_dagster.resources import DataResource, StoreResource


def register_benchmarks(instance: DagsterInstance, benchmarks_dir) -> tuple[list[str], list[str]]:
    """Add a partition for every benchmark sub-folder with a val split; returns (all, added)."""
    names = sorted(find_benchmarks(benchmarks_dir))
    known = set(instance.get_dynamic_partitions(BENCHMARKS_PARTITION_NAME))
    added = [n for n in names if n not in known]
    if added:
        instance.add_dynamic_partitions(BENCHMARKS_PARTITION_NAME, added)
    return names, added


@op
def register_benchmark_partitions(context: OpExecutionContext, store: StoreResource, data: DataResource) -> None:
    """Scan the configured benchmarks folder and register the new benchmarks as partitions."""
    paths = data.paths(store.store())
    names, added = register_benchmarks(context.instance, paths.benchmarks)
    context.log.info(f"benchmarks in {paths.benchmarks}: {names}; newly registered: {added}")


@job(description="Register every benchmark sub-folder of the configured benchmarks folder as a partition.")
def register_benchmarks_job():
    register_benchmark_partitions()
