"""Faults: a killed run never blocks its home, a CLI waiting on a slot says so and stops on
SIGTERM, two CLI commands on one home never interleave (run_guard.py; issue 19)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from icons_dagster.assets._context import SELECTION_POOL
from icons_dagster.resources.home import write_home_config
from icons_dagster.run_guard import WORKER_TAG, pool_holders, release_dead_runs
from icons_dagster.runner import prepare_instance_home
from graph_helpers import demo_config

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("multiple_choice", "yes_no")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _instance(home: Path) -> DagsterInstance:
    return DagsterInstance.from_config(str(prepare_instance_home(home)))


def _holding_run(instance: DagsterInstance, worker: str, status=DagsterRunStatus.STARTED) -> str:
    """A run of ``worker`` that holds the selection pool's one slot (as a vote step does)."""
    run_id = str(uuid.uuid4())
    instance.add_run(DagsterRun(job_name="__ephemeral_asset_job__", run_id=run_id, status=status, tags={WORKER_TAG: worker}))
    storage = instance.event_log_storage
    storage.initialize_concurrency_limit_to_default(SELECTION_POOL)
    assert storage.claim_concurrency_slot(SELECTION_POOL, run_id, "vote_table").is_claimed
    return run_id


def _status(instance: DagsterInstance, run_id: str) -> DagsterRunStatus:
    return instance.get_run_by_id(run_id).status


def test_dead_workers_runs_are_failed_and_their_slots_freed(tmp_path):
    instance = _instance(tmp_path)
    host = socket.gethostname()
    dead = _holding_run(instance, f"{host}-{_dead_pid()}")
    assert pool_holders(instance, SELECTION_POOL) == [f"run {dead} (STARTED, {host}-{instance.get_run_by_id(dead).tags[WORKER_TAG].rsplit('-', 1)[1]})"]
    assert release_dead_runs(instance) == [dead]
    assert _status(instance, dead) == DagsterRunStatus.FAILURE
    assert pool_holders(instance, SELECTION_POOL) == [] and instance.event_log_storage.get_concurrency_run_ids() == set()

    # A live worker's run, and another machine's, keep their slot and status: not ours to judge.
    live = _holding_run(instance, f"{host}-{os.getpid()}")
    assert release_dead_runs(instance) == [] and _status(instance, live) == DagsterRunStatus.STARTED
    assert len(pool_holders(instance, SELECTION_POOL)) == 1
    instance.event_log_storage.free_concurrency_slots_for_run(live)
    elsewhere = _holding_run(instance, f"{host}.elsewhere-{_dead_pid()}")
    assert release_dead_runs(instance) == [] and _status(instance, elsewhere) == DagsterRunStatus.STARTED
    instance.event_log_storage.free_concurrency_slots_for_run(elsewhere)

    # A run that ended (failed from the UI, say) but kept its slot: the slot is freed.
    ended = _holding_run(instance, "no-worker-recorded", status=DagsterRunStatus.FAILURE)
    assert release_dead_runs(instance) == [] and pool_holders(instance, SELECTION_POOL) == []
    assert ended not in instance.event_log_storage.get_concurrency_run_ids()


_DIE_IN_VOTE = """
import os, signal, sys
from pathlib import Path
import icons_dagster.assets.selection as selection
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
selection.stage_vote_table = die
from icons_dagster.resources.home import read_home_config
from icons_dagster.runner import run_graph
run_graph(Path(sys.argv[1]), read_home_config(Path(sys.argv[1])))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DAGSTER_DISABLE_TELEMETRY": "1"}


def _cli(home: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "icons_dagster.cli", "--home", str(home), "run"],
        env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )


def _read_until(stream, needle: str, seconds: float) -> str:
    """``stream`` up to the end of the line that holds ``needle`` (tqdm redraws with \\r: read characters)."""
    seen, deadline = "", time.monotonic() + seconds
    while not (needle in seen and seen.endswith("\n")) and time.monotonic() < deadline:
        char = stream.read(1)
        if not char:
            break
        seen += char
    return seen


def test_a_run_killed_in_the_vote_never_blocks_the_home(demo_paths, tmp_path):
    benchmarks = tmp_path / "benchmarks"
    for name in BENCHMARKS:
        (benchmarks / name).mkdir(parents=True)
        for f in (demo_paths.benchmarks / name).iterdir():
            (benchmarks / name / f.name).symlink_to(f)
    home = tmp_path / "home"
    write_home_config(home, demo_config(demo_paths, benchmarks))

    # 1. SIGKILL inside vote_table, holding the selection pool's only slot.
    died = subprocess.run([sys.executable, "-c", _DIE_IN_VOTE, str(home)], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    instance = _instance(home)
    (killed,) = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    assert killed.tags[WORKER_TAG] == f"{socket.gethostname()}-{killed.tags[WORKER_TAG].rsplit('-', 1)[1]}"
    assert instance.event_log_storage.get_concurrency_run_ids() == {killed.run_id}
    features = {p: p.stat().st_mtime_ns for p in (home / "artifacts").rglob("*.npy")}

    # 2. The next CLI run fails the dead run, frees its slot, reuses every committed artifact, finishes.
    rerun = _cli(home)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert "ICONS subset (LLaVA JSON)" in out
    assert _status(instance, killed.run_id) == DagsterRunStatus.FAILURE
    assert {p: p.stat().st_mtime_ns for p in features} == features  # nothing recomputed
    assert instance.event_log_storage.get_concurrency_run_ids() == set()

    # 3. A live run holds the slot: the CLI says which and waits; SIGTERM stops it at once.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        holder = _holding_run(instance, f"{socket.gethostname()}-{sleeper.pid}")
        waiting = _cli(home)
        seen = _read_until(waiting.stderr, "waiting for a slot", 240)
        assert f"waiting for a slot of pool '{SELECTION_POOL}', held by run {holder} (STARTED" in seen, seen[-2000:]
        # 4. A second CLI command on the home refuses at once, naming the first.
        second = _cli(home)
        _, second_err = second.communicate(timeout=120)
        assert second.returncode == 3 and "in use by 'icons-dagster run' (worker" in second_err and f"-{waiting.pid}" in second_err, second_err
        waiting.send_signal(signal.SIGTERM)
        assert waiting.wait(timeout=30) == 130
        assert "interrupted" in waiting.stderr.read()
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder died: the next run goes through.
    after = _cli(home)
    _, err = after.communicate(timeout=300)
    assert after.returncode == 0, err[-3000:]
    assert _status(instance, holder) == DagsterRunStatus.FAILURE
