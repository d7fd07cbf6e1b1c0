"""The unit of distribution: a backfill of ``training_gradients_job`` over the shard partitions.

Each shard is one run; how runs are spread over machines is the deployment's launcher and
executor (deploy/): the run queue's concurrency limits on one box, a Kubernetes pod per run
(``dagster-k8s/config`` tags ask for its GPU), or Celery workers that take the shard steps
from a queue. ``icons.json``'s ``scaleout`` section sets both without code:
``shard_run_tags`` go on every shard run, and ``shard_executor`` names the executor of the
shard job (``"in_process"``, the default, or ``{"celery": {broker, backend, config_source,
...}}``, the dagster-celery executor's own config; ``config_source.task_default_queue``
names the queue the GPU workers listen on).
"""

from __future__ import annotations

from typing import Any

from dagster import AssetSelection, DagsterInvalidConfigError, ExecutorDefinition, PartitionsDefinition, define_asset_job, job, op, validate_run_config

from icons_dagster.core.config import ScaleoutConfig

SHARD_JOB = "training_gradients_job"
SHARD_TAG = "icons/shard-run"


SHARD_EXECUTORS = ("in_process", "celery")


def shard_executor(spec: str | dict[str, Any] | None, source: str = "icons.json") -> ExecutorDefinition | None:
    """The shard job's executor from ``scaleout.shard_executor``, its config already checked
    (a bad one fails here, naming the file, not when the first shard run starts); None keeps
    the definitions' own."""
    if spec in (None, "in_process"):
        return None
    if spec == "celery":
        spec = {"celery": {}}
    if not (isinstance(spec, dict) and list(spec) == ["celery"] and isinstance(spec["celery"], dict)):
        raise ValueError(f"{source}: scaleout.shard_executor must be one of {list(SHARD_EXECUTORS)} or {{\"celery\": {{...}}}}, got {spec!r}")
    try:
        from dagster_celery import celery_executor
    except ImportError as error:
        raise ValueError(f"{source}: scaleout.shard_executor is celery but dagster-celery is not installed (pip install 'icons-dagster[celery]')") from error
    executor = celery_executor.configured(spec["celery"], name="icons_celery_executor")
    _check_executor_config(executor, source)
    return executor


def shard_job_from_config(scaleout: ScaleoutConfig, shards: PartitionsDefinition, source: str = "icons.json"):
    """The shard job over ``shards`` as ``icons.json``'s ``scaleout`` section describes it."""
    return training_gradients_job(shards, dict(scaleout.shard_run_tags), shard_executor(scaleout.shard_executor, source))


@op
def _nothing() -> None:
    pass


def _check_executor_config(executor: ExecutorDefinition, source: str) -> None:
    """Validate a configured executor's config through a throwaway one-op job (public API)."""

    @job(executor_def=executor)
    def _probe():
        _nothing()

    try:
        validate_run_config(_probe, {})
    except DagsterInvalidConfigError as error:
        raise ValueError(f"{source}: scaleout.shard_executor: {error}") from error


def training_gradients_job(shards: PartitionsDefinition, tags: dict[str, Any] | None = None, executor: ExecutorDefinition | None = None):
    """One run per training shard; ``tags`` (e.g. a K8s GPU limit) go on every run, and
    ``executor`` (e.g. Celery) runs its step where the deployment wants it."""
    return define_asset_job(
        SHARD_JOB,
        selection=AssetSelection.assets("training_gradients"),
        partitions_def=shards,
        tags={SHARD_TAG: "true", **(tags or {})},
        executor_def=executor,
        description="Training-gradient features, one run per shard: backfill it to spread the pool over GPUs.",
    )
