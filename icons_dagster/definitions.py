"""The one Definitions object: assets, resources, jobs, the benchmark sensor and automation.

Configuration comes from the home's ``icons.json`` (written by the CLI), so the UI and the
CLI agree. It is read when Dagster loads the code location (``defs`` is lazy), not when
this module is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dagster import Definitions, definitions, in_process_executor

from icons_dagster.assets import ICONS_ASSETS
from icons_dagster.assets.evaluation import EVALUATION_ASSETS
from icons_dagster.assets.ofa import OFA_ASSETS
from icons_dagster.automation import benchmark_folder_sensor, icons_automation_sensor, vote_job, vote_schedule
from icons_dagster.core.storage.fingerprint import ALGORITHM_VERSION, fingerprint
from icons_dagster.core.schema import IconsConfig
from icons_dagster.core.stages.settings import stage_settings
from icons_dagster.graph_job import whole_graph_job
from icons_dagster.jobs import graph_jobs
from icons_dagster.partitions import shard_partitions, train_shard_partitions
from icons_dagster.registration import explain_sample_job, register_benchmarks_job
from icons_dagster.resources import SECTION_RESOURCES, StoreResource
from icons_dagster.resources.home import STORE_URL_ENV, config_file, read_home_config, resolve_home
from icons_dagster.resources.refs import ArtifactRefIOManager
from icons_dagster.scaleout import shard_job_from_config
from icons_dagster.staleness import stale_partition_checks, stale_partitions_sensor

GRAPH_ASSETS = [*ICONS_ASSETS, *OFA_ASSETS, *EVALUATION_ASSETS]


def build_resources(home: Path, config: IconsConfig) -> dict[str, Any]:
    """The store and one resource per configuration section, from ``config``."""
    # the shared store: icons.json "store": {"remote": URL}, or ICONS_STORE_URL
    remote = config.store.remote or os.environ.get(STORE_URL_ENV, "")
    document = config.to_json()
    return {
        "store": StoreResource(root=str(home), remote=remote),
        "refs_io_manager": ArtifactRefIOManager(root=str(home), remote=remote),
        **{section: resource(**document[section]) for section, resource in SECTION_RESOURCES.items()},
    }


def asset_code_versions(config: IconsConfig) -> dict[str, str]:
    """Code version of each asset = fingerprint of the settings its stage fingerprints, so the
    UI marks exactly the assets a config change affects (and their downstream) as stale."""
    return {asset: f"{ALGORITHM_VERSION}-{fingerprint(asset, **settings)}" for asset, settings in stage_settings(config).items()}


def graph_assets(config: IconsConfig) -> list:
    """Every asset with its code version, the configured shard count on the shard assets, and
    the catalog's owners and tags."""
    versions = asset_code_versions(config)
    shards = shard_partitions(config.data.num_shards)

    def configured(spec):
        partitions = shards if spec.partitions_def == train_shard_partitions else spec.partitions_def
        # docstrings are reST (``code``); the UI renders descriptions as Markdown (`code`)
        description = (spec.description or "").replace("``", "`")
        return spec.replace_attributes(
            code_version=versions[spec.key.to_user_string()],
            partitions_def=partitions,
            description=description,
            owners=list(config.catalog.owners),
            tags={**spec.tags, **dict(config.catalog.tags)},
        )

    return [a.map_asset_specs(configured) for a in GRAPH_ASSETS]


def build_definitions(home: str | Path | None = None, config: IconsConfig | None = None) -> Definitions:
    """Definitions for one home; ``config`` defaults to the home's icons.json."""
    home_path = resolve_home(home)
    config = config if config is not None else read_home_config(home_path)
    assets = graph_assets(config)
    interval = config.automation.sensor_interval_seconds
    return Definitions(
        assets=assets,
        jobs=[
            *graph_jobs(assets, config),
            whole_graph_job(home_path, config),
            register_benchmarks_job,
            explain_sample_job,
            vote_job,
            shard_job_from_config(config.scaleout, shard_partitions(config.data.num_shards), str(config_file(home_path))),
        ],
        asset_checks=stale_partition_checks(assets),
        sensors=[benchmark_folder_sensor(interval), icons_automation_sensor(interval), stale_partitions_sensor(interval)],
        schedules=[vote_schedule(config.automation.vote_cron)],
        resources=build_resources(home_path, config),
        # A subprocess per step would re-import torch and reload the model for every step.
        executor=in_process_executor,
    )


@definitions
def defs() -> Definitions:
    """The home's definitions (``ICONS_HOME``), loaded when Dagster loads the code location."""
    return build_definitions()
