"""The unit of distribution: a backfill of ``training_gradients_job`` over the shard partitions.

Each shard is one run; how runs are spread over machines is the deployment's launcher and
executor (deploy/): the run queue's concurrency limits on one box, a Kubernetes pod per run
(``dagster-k8s/config`` tags ask for its GPU), or Celery workers. The tags every shard run
carries come from ``icons.json``'s ``scaleout.shard_run_tags``, so a deployment sets GPU
requests and queue names without code.
"""

from __future__ import annotations

from typing import Any

from dagster import AssetSelection, define_asset_job

from icons_dagster.partitions import train_shard_partitions

SHARD_JOB = "training_gradients_job"
SHARD_TAG = "icons/shard-run"


def training_gradients_job(tags: dict[str, Any] | None = None):
    """One run per training shard; ``tags`` (e.g. a K8s GPU limit) go on every run."""
    return define_asset_job(
        SHARD_JOB,
        selection=AssetSelection.assets("training_gradients"),
        partitions_def=train_shard_partitions,
        tags={SHARD_TAG: "true", **(tags or {})},
        description="Training-gradient features, one run per shard: backfill it to spread the pool over GPUs.",
    )
