"""The whole graph as one job on the UI's Jobs page: its run runs the graph's runs, as the
CLI does, so the UI gets the CLI's order (one partitions definition per run) in one click."""

from pathlib import Path

from dagster import Config, Failure, MetadataValue, Nothing, OpExecutionContext, Out, Output, job, op
from pydantic import Field

from icons_dagster.core.schema import IconsConfig
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.run_guard import HomeBusy, home_lock
from icons_dagster.steps import INVOCATION_TAG, StepFailed, materialize_graph

GRAPH_JOB = "icons_graph_job"


class GraphJobConfig(Config):
    methods: list[str] = Field(default=["icons"], description="Asset groups to materialize with everything upstream: icons, ofa, evaluation.")


def whole_graph_job(home: Path, icons_config: IconsConfig):
    """The job for one home and configuration (the definitions' own)."""

    @op(out=Out(Nothing))
    def materialize_whole_graph(context: OpExecutionContext, config: GraphJobConfig) -> Output:
        """Every run of the graph in order, each tagged icons/invocation=<this run's id>."""
        say = context.log.info
        try:
            with home_lock(ArtifactStore(home).dagster_home, f"{GRAPH_JOB} run {context.run_id}"):
                summary = materialize_graph(
                    context.repository_def, home, icons_config, context.instance, methods=tuple(config.methods), invocation=context.run_id,
                    on_step=lambda index, total, step: say(f"step {index + 1}/{total}: {step.label}"), on_wait=say,
                )
        except (HomeBusy, StepFailed, ValueError) as error:  # the user's to act on: one line, no traceback
            failed_run = {"failed_run": MetadataValue.dagster_run(error.run_id)} if isinstance(error, StepFailed) else {}  # a link to its log
            raise Failure(description=str(error), metadata=failed_run, allow_retries=False) from None
        paths = {key: MetadataValue.path(value) for key, value in summary.items() if key.endswith(("_json", "_parquet", "_selector", "_table"))}
        return Output(None, metadata={"steps": summary["steps"], "benchmarks": summary["benchmarks"], "runs": MetadataValue.text(f"tag {INVOCATION_TAG}={context.run_id}"), **paths})

    @job(name=GRAPH_JOB, description="The whole graph in the CLI's order, one run per step (config: methods). Its runs carry icons/invocation=<this run's id>.")
    def graph_job():
        materialize_whole_graph()

    return graph_job
