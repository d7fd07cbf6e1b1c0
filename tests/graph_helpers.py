"""Helpers shared by the tests that run the asset graph on a temporary Dagster instance."""

from __future__ import annotations

import atexit
import functools
import hashlib
import shutil
import tempfile
from pathlib import Path

from dagster import AssetCheckKey, AssetKey, DagsterInstance

from icons_dagster.core.data.pool import shard_keys
from icons_dagster.core.schema import IconsConfig
from icons_dagster.demo.bootstrap import demo_settings


@functools.lru_cache(maxsize=1)
def tiny_model() -> Path:
    """The random tiny LLaVA, built once per test session (graph tests check plumbing, not learning)."""
    from icons_dagster.demo.build import ensure_demo_model

    folder = Path(tempfile.mkdtemp(prefix="icons-tiny-model-"))
    atexit.register(shutil.rmtree, folder, True)
    return ensure_demo_model(folder)


def demo_config(demo_paths, benchmarks_dir: Path, **sections: dict) -> IconsConfig:
    """The demo's settings on the test-size demo data and the random tiny model, with a small
    projection for speed and the warm-up's LoRA for one epoch in the evaluation; ``sections``
    override fields (``gradients={"seed": 1}``)."""
    document = demo_settings(
        data={"pool": str(demo_paths.pool), "image_root": str(demo_paths.image_root), "benchmarks": str(benchmarks_dir)},
        model={"name_or_path": str(tiny_model())},
        gradients={"dim": 256},
    )
    document["evaluation"] = {"batch_size": 4}
    return IconsConfig.from_json(document).replace(**sections)


def shards_of(config: IconsConfig) -> list[str]:
    return shard_keys(config.data.num_shards)


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
