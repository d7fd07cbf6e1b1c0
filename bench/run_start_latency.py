"""Where a daemon-launched run's seconds go before its step starts (issue 20, item 3).

A run the UI or a sensor launches is queued, dequeued by the daemon, handed by the
DefaultRunLauncher to the code server, which starts a new process that imports the code
location and opens the instance; only then does the step run. This bench launches
``register_benchmarks_job`` (one sub-second op, no pool) through the real daemon on a demo
home, one run alone and then ``--burst`` runs at once, under Dagster's default run queue and
under the home's ``dagster.yaml`` (which takes queued runs every second), and splits each run's wall time by
its own events: queued (enqueued -> starting: the queue daemon's wait), launch (starting ->
RUN_START: the worker process and the definitions), step (STEP_START -> STEP_SUCCESS) and the rest. The baseline
in the same run: the same job executed in this process (what the CLI does), and the bare
import of the code location in a fresh interpreter.

    python bench/run_start_latency.py --home /tmp/latency   # prints and writes latency.json there
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAUNCH = """
mutation ($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) { __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } }
}
"""
JOB = "register_benchmarks_job"


def run_phases(instance, run_id: str) -> dict[str, float]:
    """Seconds of each phase of one run, from its event log."""
    from dagster import DagsterEventType

    times: dict[str, float] = {}
    for record in instance.get_records_for_run(run_id, limit=10_000).records:
        event = record.event_log_entry
        kind = event.dagster_event_type
        if kind is not None and kind.value not in times:
            times[kind.value] = event.timestamp
    dequeued = times[DagsterEventType.RUN_STARTING.value]  # the queue daemon marks a run starting as it hands it to the launcher
    enqueued = times.get(DagsterEventType.RUN_ENQUEUED.value, dequeued)
    start, end = times[DagsterEventType.RUN_START.value], times[DagsterEventType.RUN_SUCCESS.value]
    step = times[DagsterEventType.STEP_SUCCESS.value] - times[DagsterEventType.STEP_START.value]
    return {"queued": dequeued - enqueued, "launch": start - dequeued, "step": step, "rest": end - start - step, "total": end - enqueued}


def launch_and_wait(instance, context, count: int) -> list[dict[str, float]]:
    from dagster_graphql.test.utils import execute_dagster_graphql

    from icons_dagster.jobs import CODE_LOCATION, REPOSITORY

    params = {"selector": {"repositoryLocationName": CODE_LOCATION, "repositoryName": REPOSITORY, "jobName": JOB}, "runConfigData": {}}
    ids = []
    for _ in range(count):
        answer = execute_dagster_graphql(context, LAUNCH, {"params": params}).data["launchPipelineExecution"]
        if answer["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(answer)
        ids.append(answer["run"]["runId"])
    deadline = time.monotonic() + 600
    while not all(instance.get_run_by_id(i).is_finished for i in ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"runs not finished in 600 s: {ids}")
        time.sleep(0.5)
    if not all(instance.get_run_by_id(i).is_success for i in ids):
        raise RuntimeError(f"a run failed: {ids}")
    return [run_phases(instance, i) for i in ids]


def summary(phases: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {name: {"mean": round(statistics.fmean(p[name] for p in phases), 2), "max": round(max(p[name] for p in phases), 2)} for name in phases[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--size", default="test", help="demo size of the home (default test)")
    parser.add_argument("--burst", type=int, default=4, help="runs launched at once after the single one (default 4)")
    args = parser.parse_args()
    home = args.home.resolve()

    from dagster import DagsterInstance
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget

    from icons_dagster.definitions import build_definitions
    from icons_dagster.jobs import CODE_LOCATION
    from icons_dagster.demo.bootstrap import bootstrap_demo
    from icons_dagster.runner import machine_run_slots, prepare_instance_home, run_graph

    prepare_instance_home(home)
    config = bootstrap_demo(home, args.size)
    run_graph(home, config)  # a home as the CLI builds it

    results: dict = {"machine": f"{os.cpu_count()} cores", "max_concurrent_runs": machine_run_slots(), "job": JOB}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {CODE_LOCATION}"], check=True, capture_output=True)
    results["import_code_location_s"] = round(time.perf_counter() - started, 2)
    with DagsterInstance.get() as instance:
        started = time.perf_counter()
        assert build_definitions(home, config).resolve_job_def(JOB).execute_in_process(instance=instance).success
        results["in_process_run_s"] = round(time.perf_counter() - started, 2)

    yaml = home / "dagster" / "dagster.yaml"
    ours = yaml.read_text()
    dagster_default = ours[: ours.index("run_queue:")] + ours[ours.index("# With the daemon") :]  # no run_queue block
    for variant, text in (("dagster_default_queue", dagster_default), ("home_dagster_yaml", ours)):
        yaml.write_text(text)
        with DagsterInstance.get() as instance:
            log = (home / "daemon.log").open("ab")
            daemon = subprocess.Popen([str(Path(sys.executable).with_name("dagster-daemon")), "run", "-m", CODE_LOCATION], cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                with WorkspaceProcessContext(instance, ModuleTarget(CODE_LOCATION, None, None, None)) as workspace:
                    context = workspace.create_request_context()
                    results[variant] = {"single": summary(launch_and_wait(instance, context, 1))}
                    results[variant]["burst"] = {"runs": args.burst, **summary(launch_and_wait(instance, context, args.burst))}
            finally:
                os.killpg(daemon.pid, 2)
                daemon.wait(timeout=60)
    yaml.write_text(ours)
    (home / "latency.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
