"""Scale-out with Dagster's own machinery, proved locally.

- A backfill of ``training_gradients_job`` over every shard, run by the real daemon
  (backfill daemon + run queue limited to two shard runs at a time by
  deploy/single-machine/dagster.yaml, each run its own process), writes features
  byte-identical to a single-process run at the same thread count.
- A shard run killed mid-way leaves nothing a later run trusts and is recomputed on retry.
- GPU leases: concurrent run processes never share a device.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from icons_dagster.core.devices import lease_device, release_devices
from icons_dagster.core.store import COMPLETE_MARKER
from icons_dagster.resources.home import write_home_config
from graph_helpers import demo_config

REPO = Path(__file__).resolve().parents[1]
SHARDS = [f"shard-{i:04d}" for i in range(4)]
THREADS = "1"  # every process, reference and backfill runs alike


def _env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DAGSTER_HOME": str(home / "dagster"),
        "ICONS_HOME": str(home),
        "ICONS_NUM_SHARDS": "4",
        "OMP_NUM_THREADS": THREADS,
        "MKL_NUM_THREADS": THREADS,
        "HF_HUB_OFFLINE": "1",
        "DAGSTER_DISABLE_TELEMETRY": "1",
    }


def _home(root: Path, demo_paths, model_dir: Path, dagster_yaml: str) -> Path:
    """A home on the test demo; every home names the same model folder, so fingerprints agree."""
    home = root
    (home / "dagster").mkdir(parents=True)
    (home / "dagster" / "dagster.yaml").write_text(dagster_yaml)
    config = demo_config(demo_paths, demo_paths.benchmarks)
    config["model"]["name_or_path"] = str(model_dir)
    write_home_config(home, config)
    return home


def _python(home: Path, code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=_env(home), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


# Materialize the given assets (and partition) of the home's definitions in this process.
_MATERIALIZE = """
import sys
from dagster import AssetKey, DagsterInstance, materialize
from icons_dagster.definitions import defs
keys = [AssetKey(k) for k in sys.argv[1].split(",")]
partition = sys.argv[2] if len(sys.argv) > 2 else None
assets = list(defs.assets)
ok = materialize(assets, selection=keys, partition_key=partition, instance=DagsterInstance.get(), resources=defs.resources).success
sys.exit(0 if ok else 1)
"""


def _materialize(home: Path, keys: str, partition: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    args = [sys.executable, "-c", _MATERIALIZE, keys, *([partition] if partition else [])]
    return subprocess.run(args, env=_env(home), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def _feature_files(home: Path) -> dict[str, bytes]:
    root = home / "artifacts" / "training_gradients"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


QUEUE_YAML = (REPO / "deploy" / "single-machine" / "dagster.yaml").read_text()


@pytest.fixture(scope="module")
def reference_home(demo_paths, tiny_model_dir, tmp_path_factory):
    """Head and every shard materialized one after another in a single process."""
    home = _home(tmp_path_factory.mktemp("single"), demo_paths, tiny_model_dir, "telemetry:\n  enabled: false\n")
    done = _materialize(home, "training_pool,warmup_subset,warmup_checkpoint")
    assert done.returncode == 0, done.stderr[-3000:]
    code = "\n".join(
        [_MATERIALIZE.split("keys =")[0], "for s in %r:" % SHARDS,
         "    assert materialize(list(defs.assets), selection=[AssetKey('training_gradients')], partition_key=s, instance=DagsterInstance.get(), resources=defs.resources).success"]
    )
    done = _python(home, code)
    assert done.returncode == 0, done.stderr[-3000:]
    return home


def test_backfill_two_runs_at_a_time_is_byte_identical_to_one_process(demo_paths, tiny_model_dir, tmp_path, reference_home):
    home = _home(tmp_path / "home", demo_paths, tiny_model_dir, QUEUE_YAML)
    done = _materialize(home, "training_pool,warmup_subset,warmup_checkpoint")
    assert done.returncode == 0, done.stderr[-3000:]
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(f"load_from:\n  - python_module:\n      module_name: icons_dagster.definitions\n      working_directory: {REPO}\n")
    daemon_log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(workspace)],
        env=_env(home), cwd=REPO, stdout=daemon_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        submitted = subprocess.run(
            [sys.executable, "-m", "dagster", "job", "backfill", "-j", "training_gradients_job", "--all", "--noprompt", "-w", str(workspace)],
            env=_env(home), cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
        instance = DagsterInstance.from_config(str(home / "dagster"))
        deadline = time.time() + 600
        while time.time() < deadline:
            runs = instance.get_runs(RunsFilter(job_name="training_gradients_job"))
            if len(runs) == len(SHARDS) and all(r.is_finished for r in runs):
                break
            time.sleep(2)
        runs = instance.get_runs(RunsFilter(job_name="training_gradients_job"))
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)
        daemon_log.close()
    log_tail = (tmp_path / "daemon.log").read_text()[-3000:]
    assert len(runs) == len(SHARDS), f"{len(runs)} shard runs; daemon log: {log_tail}"
    assert {r.status for r in runs} == {DagsterRunStatus.SUCCESS}, [(r.tags.get("dagster/partition"), r.status) for r in runs] + [log_tail]
    assert sorted(r.tags["dagster/partition"] for r in runs) == SHARDS
    assert all("dagster/backfill" in r.tags and r.tags["icons/shard-run"] == "true" for r in runs)
    # the queue held them to two at a time, and two did run together
    spans = [(instance.get_run_stats(r.run_id).start_time, instance.get_run_stats(r.run_id).end_time) for r in runs]
    overlap = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert overlap == 2
    # every feature file, sample table and manifest byte for byte as the single process wrote it
    mine, reference = _feature_files(home), _feature_files(reference_home)
    assert sorted(mine) == sorted(reference) and any(name.endswith(".npy") for name in mine)
    different = [name for name in mine if mine[name] != reference[name] and not name.endswith(COMPLETE_MARKER)]
    assert different == []


# The shard run dies (SIGKILL, no clean-up) right after its first feature file is written
# into the artifact's temporary folder: a crash in the middle of writing.
_DIE_WHILE_WRITING = """
import os, signal
import icons_dagster.core.features as features
real = features.save_npy
def save_then_die(path, array):
    real(path, array)
    os.kill(os.getpid(), signal.SIGKILL)
features.save_npy = save_then_die
""" + _MATERIALIZE


def test_a_shard_run_killed_mid_way_is_recomputed_on_retry(tmp_path, reference_home):
    home = tmp_path / "home"
    shutil.copytree(reference_home, home, ignore=shutil.ignore_patterns("training_gradients", "dagster"))
    (home / "dagster").mkdir()
    (home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    shard_root = home / "artifacts" / "training_gradients"
    died = subprocess.run(
        [sys.executable, "-c", _DIE_WHILE_WRITING, "training_gradients", SHARDS[1]],
        env=_env(home), cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    leftovers = [p for p in shard_root.rglob(".tmp-*") if p.is_dir()]
    assert len(leftovers) == 1 and any(leftovers[0].glob("*.npy"))  # half-written ...
    assert not list(shard_root.rglob(COMPLETE_MARKER))  # ... and nothing a later run would trust
    retried = _materialize(home, "training_gradients", SHARDS[1])
    assert retried.returncode == 0, retried.stderr[-3000:]
    mine = {k: v for k, v in _feature_files(home).items() if ".tmp-" not in k}
    reference = {k: v for k, v in _feature_files(reference_home).items() if k.split("/")[1] == SHARDS[1]}
    assert sorted(mine) == sorted(reference)
    assert all(mine[k] == reference[k] for k in mine if not k.endswith(COMPLETE_MARKER))


def test_gpu_leases_never_share_a_device(tmp_path):
    hold = (
        "import sys, time; from icons_dagster.core.devices import lease_device;"
        "print(lease_device(2, sys.argv[1]), flush=True); time.sleep(60)"
    )
    other = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "0"  # the other process holds GPU 0
        assert lease_device(2, tmp_path) == 1
        assert lease_device(2, tmp_path) == 1  # the same lease on later calls
        third = subprocess.run([sys.executable, "-c", hold, str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert third.returncode != 0 and "all 2 GPUs are leased" in third.stderr
    finally:
        other.kill()
        other.wait()
        release_devices()
    # a killed holder's lease is free again
    assert lease_device(2, tmp_path) == 0
    release_devices()


def test_deploy_configs_name_the_shard_runs_this_code_tags():
    import json as jsonlib

    import yaml

    from icons_dagster.definitions import build_definitions
    from icons_dagster.scaleout import SHARD_JOB, SHARD_TAG

    values = yaml.safe_load((REPO / "deploy" / "kubernetes" / "values.yaml").read_text())
    limits = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    assert [limit["key"] for limit in limits] == [SHARD_TAG]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    single = yaml.safe_load(QUEUE_YAML)
    assert [limit["key"] for limit in single["concurrency"]["runs"]["tag_concurrency_limits"]] == [SHARD_TAG]
    # the K8s config's shard-run tags (one GPU per pod) land on every shard run
    config = jsonlib.loads((REPO / "deploy" / "kubernetes" / "icons-config.json").read_text())
    job = build_definitions(REPO / ".no-home", config).resolve_job_def(SHARD_JOB)
    k8s = job.tags["dagster-k8s/config"]
    k8s = jsonlib.loads(k8s) if isinstance(k8s, str) else k8s
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job.tags[SHARD_TAG] == "true"
