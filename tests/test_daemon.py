"""The real ``dagster-daemon`` on a home built by the CLI computes a benchmark dropped in while
it was down: at its first start (no automation cursor yet) and after a restart."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from icons_dagster.jobs import CODE_LOCATION
from icons_dagster.runner import prepare_instance_home, run_graph
from graph_helpers import demo_config

FIRST, DROPPED_BEFORE_START, DROPPED_WHILE_STOPPED = "yes_no", "multiple_choice", "counting"
INTERVAL = 1  # automation.sensor_interval_seconds: the daemon's ticks, fast for the test


def materialized_after(instance, storage_id: int) -> list[str]:
    """Every materialization after ``storage_id`` as 'asset[partition]'."""
    found = []
    for asset in ("training_pool", "warmup_checkpoint", "training_gradients", "validation_gradients", "task_influence", "vote_table", "selected_subset"):
        records = instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey(asset), after_storage_id=storage_id), limit=100).records
        found += [f"{asset}[{r.partition_key}]" if r.partition_key else asset for r in records]
    return sorted(found)


def latest_storage_id(instance) -> int:
    records = [r for asset in ("selected_subset", "task_influence") for r in instance.fetch_materializations(AssetKey(asset), limit=1).records]
    return max(r.storage_id for r in records)


def start_daemon(home: Path, log: Path) -> subprocess.Popen:
    daemon = Path(sys.executable).with_name("dagster-daemon")
    return subprocess.Popen([str(daemon), "run", "-m", CODE_LOCATION], cwd=home, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True)


def stop_daemon(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for(instance, benchmark: str, after: int, log: Path, timeout: float = 240) -> list[str]:
    """Wait until the benchmark's influence and then the subset are materialized after ``after``."""
    expected = sorted([f"validation_gradients[{benchmark}]", f"task_influence[{benchmark}]", "vote_table", "selected_subset"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = materialized_after(instance, after)
        if set(expected) <= set(found):
            return found
        time.sleep(1)
    pytest.fail(f"{benchmark} not computed in {timeout} s: {materialized_after(instance, after)}\n{log.read_text()[-3000:]}")


def test_daemon_computes_benchmarks_dropped_while_it_was_down(demo_paths, tmp_path, monkeypatch):
    home, benchmarks = tmp_path / "home", tmp_path / "benchmarks"
    shutil.copytree(demo_paths.benchmarks / FIRST, benchmarks / FIRST)
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.setenv("ICONS_HOME", str(home))
    prepare_instance_home(home)
    config = demo_config(demo_paths, benchmarks, automation={"sensor_interval_seconds": INTERVAL})
    log = tmp_path / "daemon.log"
    with DagsterInstance.from_config(str(home / "dagster")) as instance:
        run_graph(home, config, instance=instance)  # the home as the CLI builds it: no daemon has run on it
        # first start (no automation cursor yet), then a restart: each time a folder dropped while it was down
        for name in (DROPPED_BEFORE_START, DROPPED_WHILE_STOPPED):
            after = latest_storage_id(instance)
            shutil.copytree(demo_paths.benchmarks / name, benchmarks / name)
            daemon = start_daemon(home, log)
            try:
                computed = wait_for(instance, name, after, log)
            finally:
                stop_daemon(daemon)
            # exactly the new benchmark's work and the vote: no pool, warm-up or training features
            assert {entry.split("[")[0] for entry in computed} == {"validation_gradients", "task_influence", "vote_table", "selected_subset"}
            assert [entry for entry in computed if "[" in entry] == sorted([f"task_influence[{name}]", f"validation_gradients[{name}]"])
