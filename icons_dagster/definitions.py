"""The one Definitions object: assets, resources, jobs, the benchmark sensor and automation.

Configuration comes from the home's ``icons.json`` (written by the CLI), so the UI and the
CLI agree; without one, the embedded demo runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dagster import Definitions, in_process_executor

from icons_dagster.assets import ICONS_ASSETS
from icons_dagster.automation import DEFAULT_VOTE_CRON, benchmark_folder_sensor, icons_automation_sensor, vote_job, vote_schedule
from icons_dagster.registration import register_benchmarks_job
from icons_dagster.resources import DataResource, ModelResource, SettingsResource, StoreResource
from icons_dagster.resources.home import read_home_config, resolve_home
from icons_dagster.resources.refs import ArtifactRefIOManager


def build_resources(home: Path, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "store": StoreResource(root=str(home)),
        "data": DataResource(**config.get("data", {})),
        "model": ModelResource(**config.get("model", {})),
        "settings": SettingsResource(**config.get("settings", {})),
        "refs_io_manager": ArtifactRefIOManager(root=str(home)),
    }


def build_definitions(home: str | Path | None = None, config: dict[str, Any] | None = None) -> Definitions:
    """Definitions for one home; ``config`` defaults to the home's icons.json (or the demo)."""
    home_path = resolve_home(home)
    settings = config if config is not None else read_home_config(home_path)
    return Definitions(
        assets=ICONS_ASSETS,
        jobs=[register_benchmarks_job, vote_job],
        sensors=[benchmark_folder_sensor, icons_automation_sensor],
        schedules=[vote_schedule(settings.get("automation", {}).get("vote_cron", DEFAULT_VOTE_CRON))],
        resources=build_resources(home_path, settings),
        # A subprocess per step would re-import torch and reload the model for every step.
        executor=in_process_executor,
    )


defs = build_definitions()
