"""Faults: a killed run never blocks its home, a CLI waiting on a slot says so and stops on
SIGTERM, two CLI commands on one home never interleave (run_guard.py; issue 19)."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from icons_dagster.assets._context import SELECTION_POOL
from icons_dagster.core.stages.kit import Stage
from icons_dagster.core.storage.artifacts import ArtifactStore, CorruptArtifact, load_npy, save_npy
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


# SIGKILL (no clean-up) inside a stage's write: after the stage wrote its files into the
# artifact's temporary folder, before the manifest commits it. The worst moment to die.
# One process imports everything once and forks a run per kill point (each child dies);
# between kills it records what is committed, with the test's own ``_committed``.
_KILL_CHAIN = """
import json, os, signal, sys
from contextlib import contextmanager
from pathlib import Path
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.resources.home import read_home_config
from icons_dagster.runner import run_graph
import icons_dagster.definitions  # the heavy imports, once, before any fork: the code location,
import matplotlib.figure, peft, transformers.modeling_layers  # and what its steps import when they run
{committed}
home, real, results = Path(sys.argv[1]), ArtifactStore.writing, []
for target in sys.argv[2].split(","):
    before = _committed(home)
    child = os.fork()
    if child == 0:
        @contextmanager
        def writing(self, directory, manifest):
            with real(self, directory, manifest) as tmp:
                yield tmp
                if Path(directory).relative_to(self.root / "artifacts").parts[0] == target:
                    os.kill(os.getpid(), signal.SIGKILL)
        ArtifactStore.writing = writing
        try:
            run_graph(home, read_home_config(home), methods=("icons", "ofa", "evaluation"))
        finally:
            os._exit(0)  # not reached when the kill point is
    _, status = os.waitpid(child, 0)
    killed = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    leftover = bool(list((home / "artifacts" / target).rglob(".tmp-*")))
    results.append({{"target": target, "signal": killed, "leftover": leftover, "before": before, "after": _committed(home)}})
print(json.dumps(results))
"""
#: Where the matrix kills (issue 19: pool, warm-up, a shard, validation, influence, vote,
#: subset, OFA, an evaluation fine-tune).
KILL_STAGES = (
    "training_pool", "warmup_checkpoint", "training_gradients", "validation_gradients", "task_influence",
    "vote_table", "selected_subset", "ofa_selector", "finetuned_adapter",
)


def _commit_order(home: Path) -> list[str]:
    """KILL_STAGES in the order the graph's runs first commit them (OFA's runs come between
    ICONS's): the order of the runner's waves, each wave's assets in graph order."""
    from icons_dagster.definitions import build_definitions
    from icons_dagster.resources.home import read_home_config
    from icons_dagster.steps import run_waves, selected_keys

    graph = build_definitions(home, read_home_config(home)).resolve_asset_graph()
    position = [key.to_user_string() for _, keys in run_waves(graph, selected_keys(graph, ("icons", "ofa", "evaluation"))) for key in keys]
    return sorted(KILL_STAGES, key=position.index)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DAGSTER_DISABLE_TELEMETRY": "1"}


def _cli(home: Path, command: str = "evaluate") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "icons_dagster.cli", "--home", str(home), command],
        env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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


def _committed(home: Path) -> dict[str, str]:
    """Every committed artifact's manifest file list (sizes and sha256 of its files), by folder."""
    root = home / "artifacts"
    return {
        str(marker.parent.relative_to(root)): json.dumps(json.loads(marker.read_text())["files"], sort_keys=True)
        for marker in sorted(root.rglob("_COMPLETE.json"))
    }


def _home(tmp_path: Path, name: str, demo_paths) -> Path:
    home = tmp_path / name
    benchmarks = tmp_path / "benchmarks"
    if not benchmarks.exists():
        for bench in BENCHMARKS:
            shutil.copytree(demo_paths.benchmarks / bench, benchmarks / bench)
    config = demo_config(demo_paths, benchmarks, data={"num_shards": 1}, evaluation={"methods": ["full", "icons"], "batch_size": 4})
    write_home_config(home, config)
    return home


def test_killed_at_every_stage_the_home_recovers_to_the_same_bytes(demo_paths, tmp_path):
    """SIGKILL inside each stage in turn, each rerun on the same home; then the same bytes as
    an uninterrupted run; damaged files healed; a live holder of the vote's slot, SIGTERM
    and a second CLI."""
    # The uninterrupted reference runs beside the kill chain: each takes one of the two cores.
    reference = _home(tmp_path, "reference", demo_paths)
    done = _cli(reference)
    home = _home(tmp_path, "home", demo_paths)
    order = _commit_order(home)
    script = _KILL_CHAIN.format(committed=inspect.getsource(_committed))
    with (tmp_path / "chain.out").open("w+") as out, (tmp_path / "chain.err").open("w+") as err_file:
        chain = subprocess.run([sys.executable, "-c", script, str(home), ",".join(order)], env=_env(), cwd=REPO, stdout=out, stderr=err_file, timeout=1200)
        out.seek(0), err_file.seek(0)
        chain_out, chain_err = out.read(), err_file.read()
    _, err = done.communicate(timeout=900)
    assert done.returncode == 0, err[-3000:]
    expected = _committed(reference)
    assert {key.split("/")[0] for key in expected} >= set(KILL_STAGES)
    assert chain.returncode == 0, chain_err[-3000:]
    results = json.loads(chain_out.strip().splitlines()[-1])
    assert [r["target"] for r in results] == order
    for r in results:
        stage, before, after = r["target"], r["before"], r["after"]
        assert r["signal"] == signal.SIGKILL and r["leftover"], r  # it died writing this stage ...
        assert {k: after[k] for k in before} == before, stage  # ... kept every committed artifact ...
        assert not any(k.split("/")[0] == stage and k not in before for k in after), stage  # ... and committed none of this stage
    instance = _instance(home)
    # Each killed run was failed by the next run's start; the last one is still STARTED.
    (last,) = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    assert WORKER_TAG in last.tags
    assert len(instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.FAILURE]))) == len(KILL_STAGES) - 1

    # The next command finishes without a hand: dead runs failed, slots freed, same bytes.
    rerun = _cli(home)
    _, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, err[-3000:]
    assert _committed(home) == expected
    assert not instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    assert instance.event_log_storage.get_concurrency_run_ids() == set()
    assert not list((home / "artifacts").rglob(".tmp-*"))

    # Committed files damaged afterwards (a flipped byte, a truncated table): found on read and
    # recomputed by their stages, never trusted; the home comes back to the same bytes.
    (features,) = (home / "artifacts" / "training_gradients").rglob("features-checkpoint-0.npy")
    data = bytearray(features.read_bytes())
    data[-7] ^= 0x10
    features.write_bytes(bytes(data))
    (votes,) = (home / "artifacts" / "vote_table").rglob("*.parquet")
    votes.write_bytes(votes.read_bytes()[:-50])
    healed = _cli(home)
    _, err = healed.communicate(timeout=600)
    assert healed.returncode == 0, err[-3000:]
    assert _committed(home) == expected
    for damaged in (features, votes):
        assert "replaced_corrupt_copy" in json.loads((damaged.parent / "_COMPLETE.json").read_text())["metadata"], damaged

    # A live run holds the vote's slot: the CLI says which and waits; a second CLI command on the
    # home refuses at once, naming the first; SIGTERM stops the waiting one.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        holder = _holding_run(instance, f"{socket.gethostname()}-{sleeper.pid}")
        waiting = _cli(home, "run")
        seen = _read_until(waiting.stderr, "waiting for a slot", 300)
        assert f"waiting for a slot of pool '{SELECTION_POOL}', held by run {holder} (STARTED" in seen, seen[-2000:]
        second = _cli(home, "run")
        _, second_err = second.communicate(timeout=120)
        assert second.returncode == 3 and "in use by 'icons-dagster run' (worker" in second_err and f"-{waiting.pid}" in second_err, second_err
        waiting.send_signal(signal.SIGTERM)
        assert waiting.wait(timeout=30) == 130
        assert "interrupted" in waiting.stderr.read()
    finally:
        sleeper.kill()
        sleeper.wait()
    after = _cli(home, "run")  # the holder died: the next run goes through
    _, err = after.communicate(timeout=300)
    assert after.returncode == 0, err[-3000:]
    assert _status(instance, holder) == DagsterRunStatus.FAILURE
    assert _committed(home) == expected


def _build(store: ArtifactStore) -> tuple[Stage, object]:
    """A two-file artifact (an npy and a JSON), reused when intact."""
    stage = Stage(store, "integrity_check", None, seed=1)
    if (done := stage.reused()) is not None:
        return stage, done
    with stage.building({"seed": 1}) as out:
        save_npy(out.folder / "features.npy", np.arange(4096, dtype=np.float32))
        (out.folder / "table.json").write_text('{"rows": 3}', encoding="utf-8")
    return stage, stage.result()


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "manifest"])
def test_a_corrupt_artifact_is_detected_on_read_and_recomputed(tmp_path, damage):
    store = ArtifactStore(tmp_path)
    _, first = _build(store)
    folder = store.absolute(first.ref.path)
    original = (folder / "features.npy").read_bytes()
    assert _build(store)[1].metadata["reused"]  # intact: reused
    target = folder / ("_COMPLETE.json" if damage == "manifest" else "features.npy")
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit, same size: only the checksum sees it
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-100]))
    elif damage == "remove":
        target.unlink()
    else:
        target.write_bytes(bytes(data[:-5]))  # the manifest itself cut short
    expected = {"flip": "features.npy: sha256 differs", "truncate": "features.npy: 16412 bytes, its manifest says 16512",
                "remove": "features.npy: missing", "manifest": "_COMPLETE.json unreadable"}[damage]
    if damage != "manifest":  # a reader is told by file (an unreadable manifest reads as not committed)
        with pytest.raises(CorruptArtifact, match=f"artifact {folder} is corrupt: {expected}"):
            store.absolute(first.ref.path)
    stage, again = _build(store)
    assert not again.metadata["reused"] and again.metadata["replaced_corrupt_copy"].startswith(expected)
    assert (folder / "features.npy").read_bytes() == original and np.array_equal(load_npy(folder / "features.npy"), np.arange(4096, dtype=np.float32))
    assert store.absolute(first.ref.path) == folder and _build(store)[1].metadata["reused"]
