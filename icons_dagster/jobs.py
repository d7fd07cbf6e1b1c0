"""The named jobs of the graph and the origin their runs carry: what the CLI launches and
the UI links runs to and re-executes (below ``definitions``, which serves them)."""

from __future__ import annotations

import sys
from typing import Any

from dagster import AssetSelection, define_asset_job

from icons_dagster.core.schema import IconsConfig
from icons_dagster.partitions import benchmark_partitions, evaluation_method_partitions, shard_partitions

# The code location ``dagster dev -m`` (``icons-dagster ui``, workspace.yaml) loads: the CLI's
# runs name it as their origin, so the UI links them to their job and can re-execute them.
CODE_LOCATION = "icons_dagster.definitions"
REPOSITORY = "__repository__"  # Dagster's name for the repository of a module's Definitions


def graph_job_names(config: IconsConfig) -> dict[Any, str]:
    """The asset job of each partitions definition of the graph (a run holds one): what the
    CLI runs subsets of, and what the UI re-executes."""
    return {
        None: "unpartitioned_assets_job",
        shard_partitions(config.data.num_shards): "per_shard_assets_job",
        benchmark_partitions: "per_benchmark_assets_job",
        evaluation_method_partitions: "per_method_assets_job",
    }


def asset_jobs(assets: list, config: IconsConfig) -> dict[str, str]:
    """Asset name -> the name of its partitions definition's job."""
    names = graph_job_names(config)
    jobs = {}
    for spec in (spec for a in assets for spec in a.specs):
        if spec.partitions_def not in names:
            raise ValueError(f"asset {spec.key.to_user_string()}: no job for its partitions {spec.partitions_def} (jobs.graph_job_names)")
        jobs[spec.key.to_user_string()] = names[spec.partitions_def]
    return jobs


def graph_jobs(assets: list, config: IconsConfig) -> list:
    by_job: dict[str, list[str]] = {}
    for asset, job_name in asset_jobs(assets, config).items():
        by_job.setdefault(job_name, []).append(asset)
    return [
        define_asset_job(name, AssetSelection.assets(*members), description=f"{', '.join(members)}: the CLI runs a subset of them per run, tagged icons/invocation.")
        for name, members in by_job.items()
    ]


def run_origins(job_name: str):
    """(remote origin, Python origin) of a job of this code location, as ``dagster dev -m``
    records them for its own runs."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.origin import JobPythonOrigin
    from dagster._core.remote_origin import ManagedGrpcPythonEnvCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    location = ManagedGrpcPythonEnvCodeLocationOrigin(LoadableTargetOrigin(executable_path=sys.executable, module_name=CODE_LOCATION), CODE_LOCATION)
    python = JobPythonOrigin(job_name, ReconstructableRepository.for_module(CODE_LOCATION, "defs").get_python_origin())
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, REPOSITORY), job_name), python
