"""The CLI's way into the graph: the home's instance and definitions, then the graph's runs.

Every run lands in the instance under ``<home>/dagster``, so ``dagster dev`` on the same
home shows the same runs, lineage and metadata. How the graph becomes runs: steps.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from icons_dagster.core.schema import IconsConfig
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.steps import materialize_graph

DAGSTER_YAML = """# Written by icons-dagster: a local instance under the store root.
telemetry:
  enabled: false
concurrency:
  # vote_table and selected_subset share the pool "icons_selection": one writer at a time.
  pools:
    default_limit: 1
  # Runs the daemon starts at once (a UI backfill queues the rest): what this machine holds,
  # one per GPU, else one per core, counted when the home was made. Edit to change it.
  runs:
    max_concurrent_runs: MAX_RUNS
# The daemon takes queued runs every second (Dagster's default, 5 s, is most of the wait of a
# run whose step takes one): bench/run_start_latency.py.
run_queue:
  dequeue_interval_seconds: 1
# With the daemon (dagster dev): the slots of a run that ended are freed (runs whose worker
# died are failed by the next run or CLI command on this machine: run_guard.py).
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 5
"""


def machine_run_slots() -> int:
    """Runs this machine holds at once: one per visible GPU, else one per core."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else max(1, os.cpu_count() or 1)


def prepare_instance_home(home: Path) -> Path:
    """Point DAGSTER_HOME at ``<home>/dagster`` (``dagster.yaml`` written once: telemetry off,
    the selection pool, run monitoring, a run queue sized to this machine)."""
    dagster_home = ArtifactStore(home).dagster_home
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML.replace("MAX_RUNS", str(machine_run_slots())), encoding="utf-8")
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    os.environ["ICONS_HOME"] = str(home)
    return dagster_home


def run_graph(home: Path, config: IconsConfig, instance=None, **options: Any) -> dict[str, Any]:
    """Register benchmarks and materialize the graph of the home's definitions for ``config``
    on its instance (or ``instance``); returns the subset's location and stats. ``options``:
    those of ``steps.materialize_graph`` (methods, invocation, on_step, on_wait, log_level)."""
    from dagster import DagsterInstance

    from icons_dagster.definitions import build_definitions

    if instance is None:
        prepare_instance_home(home)
        instance = DagsterInstance.get()
    repository = build_definitions(home, config).get_repository_def()  # code versions = settings fingerprints
    return materialize_graph(repository, home, config, instance, **options)
