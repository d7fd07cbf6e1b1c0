"""Jobs a user launches from the UI: register benchmark partitions; explain one sample."""


from dagster import Config, DagsterInstance, Failure, MetadataValue, Nothing, OpExecutionContext, Out, Output, job, op

from icons_dagster.core.stages.explain import explain_sample, explanation_markdown
from icons_dagster.core.data.records import find_benchmarks
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
def register_benchmark_partitions(context: OpExecutionContext, data: DataResource) -> None:
    """Scan the configured benchmarks folder and register the new benchmarks as partitions."""
    folder = data.config().benchmarks_path()
    names, added = register_benchmarks(context.instance, folder)
    context.log.info(f"benchmarks in {folder}: {names}; newly registered: {added}")


@job(description="Register every benchmark sub-folder of the configured benchmarks folder as a partition.")
def register_benchmarks_job():
    register_benchmark_partitions()


class ExplainConfig(Config):
    sample_id: str


@op(out=Out(Nothing))  # metadata only: nothing is stored
def explain_selection(context: OpExecutionContext, config: ExplainConfig, store: StoreResource) -> Output:
    """Why is this sample in (or out)? Its per-benchmark influence, votes and rank."""
    artifacts = store.store()
    try:
        explanation = explain_sample(artifacts, artifacts.read_ref("selected_subset"), artifacts.read_ref("vote_table"), config.sample_id)
    except (KeyError, FileNotFoundError) as error:  # an unknown id, or no subset yet: the user's to fix, not a bug
        reason = error.args[0] if error.args else str(error)
        raise Failure(description=reason, metadata={"sample_id": config.sample_id}, allow_retries=False) from None
    markdown = explanation_markdown(explanation)
    context.log.info(markdown)
    return Output(None, metadata={"explanation": MetadataValue.md(markdown), "details": MetadataValue.json(explanation)})


@job(description="Explain the current subset's decision about one sample (config: sample_id).")
def explain_sample_job():
    explain_selection()
