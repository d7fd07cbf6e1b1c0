"""No run outlives its process: dead runs are failed and their pool slots freed; one CLI per home.

Why: ``vote_table`` and ``selected_subset`` share a Dagster pool of one slot (one writer of
the vote at a time). A run killed while it holds the slot (SIGKILL, a lost machine) stays
STARTED, and Dagster's run monitoring cannot see that its worker died: the default run
launcher has no worker health check, and the CLI's in-process runs have no launcher at all.
So every run records its worker (``WORKER_TAG``: host and pid, set when the run's resources
start; not a shard-job run, whose step may run in a Celery worker and which holds no slot), and each run's start and each CLI command do what run monitoring does for a
launcher with a health check: a run whose worker is a dead process on this machine is
reported failed (``report_run_failed``), and the slots of every ended run are freed
(``free_concurrency_slots_for_run``, as the daemon's ``free_slots_after_run_end_seconds``
does). A run on another machine, or one whose worker lives, is never touched.

While a live run holds a slot the CLI waits in its own loop, says which run it waits
for, and stops on SIGINT/SIGTERM: Dagster defers interrupts while a step waits for a slot,
so the CLI launches a pooled step only once the pool has room. Two CLI commands on one
home never interleave: the second refuses at once (``home_lock``, an OS lock that dies
with its process).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from icons_dagster.core.storage.artifacts import owner_is_dead, owner_tag

WORKER_TAG = "icons/worker"
LOCK_FILE = "cli.lock"
POLL_SECONDS = 1.0


class HomeBusy(RuntimeError):
    """Another icons-dagster command is running on this home."""


def tag_worker(instance, run_id: str) -> None:
    """Record this process as the run's worker (the run executes in it: in-process executor)."""
    instance.add_run_tags(run_id, {WORKER_TAG: owner_tag()})


def release_dead_runs(instance) -> list[str]:
    """Fail the runs whose worker died on this machine and free the slots of every ended
    run; return the ids of the runs failed."""
    from dagster import DagsterRunStatus, RunsFilter
    from dagster._core.storage.dagster_run import FINISHED_STATUSES

    host = socket.gethostname()
    in_progress = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
    failed = []
    for run in instance.get_runs(filters=RunsFilter(statuses=in_progress)):
        worker = run.tags.get(WORKER_TAG)
        if worker is not None and owner_is_dead(worker, host):
            instance.report_run_failed(run, f"its worker {worker} died on this machine (seen by {owner_tag()})")
            failed.append(run.run_id)
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        holders = storage.get_concurrency_run_ids()
        ended = {r.run_id for r in instance.get_runs(filters=RunsFilter(run_ids=list(holders), statuses=list(FINISHED_STATUSES)))} if holders else set()
        gone = holders - {r.run_id for r in instance.get_runs(filters=RunsFilter(run_ids=list(holders)))} if holders else set()
        for run_id in sorted(ended | gone):
            storage.free_concurrency_slots_for_run(run_id)
    return failed


def pool_holders(instance, pool: str) -> list[str]:
    """One line per run holding a slot of ``pool`` when the pool is full; empty when there is room."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    info = storage.get_concurrency_info(pool)
    limit = info.limit if info.limit is not None else info.slot_count
    if limit is None or len(info.claimed_slots) < limit:
        return []
    lines = []
    for run_id in sorted(info.active_run_ids):
        run = instance.get_run_by_id(run_id)
        status = run.status.value if run is not None else "deleted"
        worker = run.tags.get(WORKER_TAG, "worker unknown") if run is not None else "worker unknown"
        lines.append(f"run {run_id} ({status}, {worker})")
    return lines


def wait_for_pools(instance, pools: set[str], say: Callable[[str], None], poll: float = POLL_SECONDS) -> None:
    """Return once every pool has a free slot; say once what is waited for. Interruptible."""
    told: set[str] = set()
    while True:
        release_dead_runs(instance)
        waiting = {pool: holders for pool in sorted(pools) if (holders := pool_holders(instance, pool))}
        if not waiting:
            return
        for pool, holders in waiting.items():
            if pool not in told:
                say(f"waiting for a slot of pool {pool!r}, held by {'; '.join(holders)}; Ctrl-C stops")
                told.add(pool)
        time.sleep(poll)


@contextlib.contextmanager
def home_lock(dagster_home: Path, holder: str) -> Iterator[None]:
    """Hold the home for one command (``holder`` names it to whoever finds the home taken:
    a CLI command, the UI's whole-graph run); HomeBusy, naming the holder, when another holds it.
    The lock is the kernel's (flock): it goes with its process, however that ends."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    path = dagster_home / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the whole command)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                held = json.loads(handle.read() or "{}")
            except ValueError:  # a holder cut off mid-write
                held = {}
            who = f"'{held.get('command', '?')}' (worker {held.get('worker', '?')}, since {held.get('since', '?')})"
            raise HomeBusy(f"{dagster_home.parent}: in use by {who}; wait for it to finish, or run on another home") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"command": holder, "worker": owner_tag(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def raise_on_sigterm() -> None:
    """SIGTERM ends the CLI as Ctrl-C does (KeyboardInterrupt), so Dagster records the run's end."""
    import signal

    def interrupt(_signo, _frame):
        raise KeyboardInterrupt

    if sys.platform != "win32":
        signal.signal(signal.SIGTERM, interrupt)
