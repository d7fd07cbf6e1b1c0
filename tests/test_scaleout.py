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
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from icons_dagster.core.model.devices import lease_device, release_devices
from icons_dagster.core.schema import load_config_file
from icons_dagster.core.storage.artifacts import COMPLETE_MARKER
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
        "OMP_NUM_THREADS": THREADS,
        "MKL_NUM_THREADS": THREADS,
        "HF_HUB_OFFLINE": "1",
        "DAGSTER_DISABLE_TELEMETRY": "1",
    }


def _home(root: Path, demo_paths, model_dir: Path, dagster_yaml: str, scaleout: dict | None = None) -> Path:
    """A home on the test demo; every home names the same model folder, so fingerprints agree."""
    home = root
    (home / "dagster").mkdir(parents=True)
    (home / "dagster" / "dagster.yaml").write_text(dagster_yaml)
    config = demo_config(demo_paths, demo_paths.benchmarks, model={"name_or_path": str(model_dir)}, scaleout=scaleout or {})
    write_home_config(home, config)
    return home


def _python(home: Path, code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=_env(home), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


# Materialize the given assets (and partition) of the home's definitions in this process.
_MATERIALIZE = """
import sys
from dagster import AssetKey, DagsterInstance, materialize
from icons_dagster.definitions import build_definitions
defs = build_definitions()
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


def _event_time(instance: DagsterInstance, run_id: str, event_type: DagsterEventType) -> float:
    """When the run's one event of this type was written; the test fails if the run has none."""
    (event,) = instance.all_logs(run_id, of_type=event_type)
    return event.timestamp


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
    # every run went through the queue, and the queue never let more than two be in flight
    # (from its launch to the run's end: the span the tag limit counts)
    spans = [(_event_time(instance, r.run_id, DagsterEventType.RUN_STARTING), _event_time(instance, r.run_id, DagsterEventType.RUN_SUCCESS)) for r in runs]
    assert all(_event_time(instance, r.run_id, DagsterEventType.RUN_ENQUEUED) <= start for r, (start, _) in zip(runs, spans))
    in_flight = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert 1 <= in_flight <= 2
    # every feature file, sample table and manifest byte for byte as the single process wrote it
    mine, reference = _feature_files(home), _feature_files(reference_home)
    assert sorted(mine) == sorted(reference) and any(name.endswith(".npy") for name in mine)
    different = [name for name in mine if mine[name] != reference[name] and not name.endswith(COMPLETE_MARKER)]
    assert different == []


def _celery_config(root: Path, queue: str) -> dict:
    """dagster-celery's executor config over Kombu's filesystem broker and Celery's file result
    backend: a real broker that needs no server, shared by processes through a folder."""
    broker = root / "broker"
    for folder in ("messages", "processed", "control"):
        (broker / folder).mkdir(parents=True)
    (root / "results").mkdir()
    return {
        "broker": "filesystem://",
        "backend": f"file://{root / 'results'}",
        "config_source": {
            "broker_transport_options": {
                "data_folder_in": str(broker / "messages"),
                "data_folder_out": str(broker / "messages"),
                "processed_folder": str(broker / "processed"),
                "control_folder": str(broker / "control"),  # else Kombu writes ./control in the repo
            },
            "task_default_queue": queue,
        },
    }


def test_a_shard_run_on_the_celery_executor_runs_in_a_worker_on_its_queue(demo_paths, tiny_model_dir, tmp_path, reference_home):
    import yaml

    queue, shard = "icons-gpu", SHARDS[2]
    celery = _celery_config(tmp_path / "celery", queue)
    home = _home(tmp_path / "home", demo_paths, tiny_model_dir, "telemetry:\n  enabled: false\n", {"shard_executor": {"celery": celery}})
    done = _materialize(home, "training_pool,warmup_subset,warmup_checkpoint")
    assert done.returncode == 0, done.stderr[-3000:]
    # the worker takes its broker from the same config block, as deploy/celery/worker.yaml does
    worker_yaml = tmp_path / "worker.yaml"
    worker_yaml.write_text(yaml.safe_dump({"execution": {"config": celery}}))
    env = {**_env(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as log:
        worker = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster-celery")), "worker", "start", "-A", "dagster_celery.app", "-y", str(worker_yaml), "-q", queue, "--", "--concurrency=1"],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            run = subprocess.run(
                [sys.executable, "-m", "dagster", "job", "execute", "-m", "icons_dagster.definitions", "-j", "training_gradients_job", "--tags", f'{{"dagster/partition": "{shard}"}}'],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=400,
            )
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:] + worker_log.read_text()[-3000:]
    assert f'Submitting celery task for step "training_gradients" to queue "{queue}"' in output
    assert "Executing steps training_gradients in celery worker" in worker_log.read_text()
    # the worker wrote the shard byte for byte as the single process did
    mine = _feature_files(home)
    reference = {k: v for k, v in _feature_files(reference_home).items() if k.split("/")[1] == shard}
    assert sorted(mine) == sorted(reference) and any(name.endswith(".npy") for name in mine)
    assert [k for k in mine if mine[k] != reference[k] and not k.endswith(COMPLETE_MARKER)] == []


def test_the_shard_executor_config_is_checked_when_the_definitions_load(tmp_path):
    from icons_dagster.core.schema import IconsConfig
    from icons_dagster.definitions import build_definitions
    from icons_dagster.scaleout import SHARD_JOB

    def definitions(document: dict):
        return build_definitions(tmp_path, IconsConfig.from_json(document, "icons.json"))

    celery = definitions({"scaleout": {"shard_executor": {"celery": {"broker": "redis://queue:6379/0"}}}})
    assert celery.resolve_job_def(SHARD_JOB).executor_def.name == "icons_celery_executor"
    assert celery.resolve_job_def("vote_job").executor_def.name == "in_process"  # only the shard runs move
    assert definitions({"scaleout": {"shard_executor": "in_process"}}).resolve_job_def(SHARD_JOB).executor_def.name == "in_process"
    with pytest.raises(ValueError, match=r"(?s)icons.json: scaleout.shard_executor: .*unexpected config entry \"brokr\""):
        definitions({"scaleout": {"shard_executor": {"celery": {"brokr": "redis://queue"}}}})
    with pytest.raises(ValueError, match=r"icons.json: scaleout.shard_executor must be one of \['in_process', 'celery'\]"):
        definitions({"scaleout": {"shard_executor": "k8s"}})
    with pytest.raises(ValueError, match=r"icons.json: scaleout: unknown settings \['shard_tags'\]"):
        definitions({"scaleout": {"shard_tags": {}}})


# The shard run dies (SIGKILL, no clean-up) right after its first feature file is written
# into the artifact's temporary folder: a crash in the middle of writing.
_DIE_WHILE_WRITING = """
import os, signal
import icons_dagster.core.features.extraction as features
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
    assert not list(shard_root.rglob(".tmp-*"))  # the retry's start removed the dead run's leftover
    mine = _feature_files(home)
    reference = {k: v for k, v in _feature_files(reference_home).items() if k.split("/")[1] == SHARDS[1]}
    assert sorted(mine) == sorted(reference)
    assert all(mine[k] == reference[k] for k in mine if not k.endswith(COMPLETE_MARKER))


def test_gpu_leases_never_share_a_device(tmp_path):
    hold = (
        "import sys, time; from icons_dagster.core.model.devices import lease_device;"
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
    config = load_config_file(REPO / "deploy" / "kubernetes" / "icons-config.json")
    job = build_definitions(REPO / ".no-home", config).resolve_job_def(SHARD_JOB)
    k8s = job.tags["dagster-k8s/config"]
    k8s = jsonlib.loads(k8s) if isinstance(k8s, str) else k8s
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job.tags[SHARD_TAG] == "true"


def test_the_k8s_shard_run_tags_pass_dagster_k8s_and_build_a_one_gpu_pod():
    """The tags in deploy/kubernetes pass dagster-k8s's own schema, and the Job manifest it
    builds from them (as the K8sRunLauncher does) asks for one GPU on a GPU node."""
    import json as jsonlib

    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    from icons_dagster.definitions import build_definitions
    from icons_dagster.scaleout import SHARD_JOB

    config = load_config_file(REPO / "deploy" / "kubernetes" / "icons-config.json")
    tags = build_definitions(REPO / ".no-home", config).resolve_job_def(SHARD_JOB).tags
    tags = {k: v if isinstance(v, str) else jsonlib.dumps(v) for k, v in tags.items()}
    user_config = get_user_defined_k8s_config(tags)
    manifest = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image="icons-dagster:test", dagster_home="/opt/dagster/dagster_home"),
        ["dagster", "api", "execute_run"], "dagster-run-shard", user_config,
    ).to_dict()
    pod = manifest["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1", "memory": "80Gi"}
    assert pod["node_selector"] == {"nvidia.com/gpu.present": "true"}
    # a typo in the tag is refused by the same schema the launcher applies
    from dagster import DagsterInvalidConfigError

    with pytest.raises(DagsterInvalidConfigError):
        get_user_defined_k8s_config({"dagster-k8s/config": jsonlib.dumps({"container_cfg": {}})})


def test_the_celery_deploy_config_and_its_worker_config_agree(monkeypatch):
    """deploy/celery: the shard job gets the Celery executor from icons-config.json, and the
    worker config that dagster-celery's own CLI validates names the same broker, backend and queue."""

    import yaml
    from dagster_celery.cli import get_validated_config

    from icons_dagster.definitions import build_definitions
    from icons_dagster.scaleout import SHARD_JOB, SHARD_TAG

    monkeypatch.setenv("ICONS_CELERY_BROKER", "redis://queue:6379/0")
    monkeypatch.setenv("ICONS_CELERY_BACKEND", "redis://queue:6379/1")
    folder = REPO / "deploy" / "celery"
    config = load_config_file(folder / "icons-config.json")
    assert build_definitions(REPO / ".no-home", config).resolve_job_def(SHARD_JOB).executor_def.name == "icons_celery_executor"
    worker = get_validated_config(str(folder / "worker.yaml"))
    assert worker["broker"] == "redis://queue:6379/0" and worker["backend"] == "redis://queue:6379/1"
    assert yaml.safe_load((folder / "worker.yaml").read_text())["execution"]["config"] == config.scaleout.shard_executor["celery"]
    instance = yaml.safe_load((folder / "dagster.yaml").read_text())
    assert "postgres" in instance["storage"]
    assert [limit["key"] for limit in instance["concurrency"]["runs"]["tag_concurrency_limits"]] == [SHARD_TAG]
