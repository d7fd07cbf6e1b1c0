"""Helpers shared by the tests that run the asset graph on a temporary Dagster instance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dagster import AssetCheckKey, AssetKey, DagsterInstance

from icons_dagster.resources.home import DEMO_PRESET


def demo_config(demo_paths, benchmarks_dir: Path, **settings) -> dict:
    """The demo preset on the test-size demo data, with a small projection for speed."""
    config = json.loads(json.dumps(DEMO_PRESET))
    config["data"] = {"pool": str(demo_paths.pool), "image_root": str(demo_paths.image_root), "benchmarks": str(benchmarks_dir)}
    config["settings"].update({"projection_dim": 256, **settings})
    config["model"]["demo_stage1_steps"] = 0  # the random tiny model: graph tests check plumbing, not learning
    config["evaluation"] = {"batch_size": 4}  # one epoch of the warm-up's LoRA: fast
    return config


def temp_instance(folder: Path) -> DagsterInstance:
    (folder / "dagster").mkdir(parents=True, exist_ok=True)
    return DagsterInstance.local_temp(str(folder / "dagster"), overrides={"telemetry": {"enabled": False}})


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def latest_metadata(instance, name: str, partition: str | None = None) -> dict:
    event = instance.get_latest_materialization_event(AssetKey(name)) if partition is None else None
    if partition is not None:
        records = instance.fetch_materializations(AssetKey(name), limit=100).records
        event = next(r.event_log_entry for r in records if r.event_log_entry.dagster_event.partition == partition)
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def check_status(instance, asset: str, check: str) -> str:
    """The latest execution status of an asset check ("SUCCEEDED", "FAILED", ...)."""
    key = AssetCheckKey(AssetKey(asset), check)
    return instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key].status.value
