"""Stale partitions: Dagster marks none, ``partitions_at_current_code_version`` names them."""

from __future__ import annotations

import shutil

from dagster import AssetKey, build_sensor_context

from icons_dagster.definitions import build_definitions
from icons_dagster.runner import run_graph
from icons_dagster.staleness import STALE_CHECK, stale_partitions_sensor
from graph_helpers import check_status, demo_config, temp_instance

BENCHMARK = "yes_no"


def tick(instance, defs, cursor=None):
    """One tick of the sensor: {asset: (passed, stale partitions)} of what it reported, and its cursor."""
    result = stale_partitions_sensor(30)(build_sensor_context(instance=instance, cursor=cursor, repository_def=defs.get_repository_def()))
    if not hasattr(result, "asset_events"):
        return {}, cursor
    return {e.asset_key.to_user_string(): (e.passed, sorted(e.metadata["stale_partitions"].value)) for e in result.asset_events}, result.cursor


def test_a_changed_setting_flags_exactly_the_partitions_it_makes_stale(demo_paths, tmp_path):
    benchmarks = tmp_path / "benchmarks"
    shutil.copytree(demo_paths.benchmarks / BENCHMARK, benchmarks / BENCHMARK)
    home = tmp_path / "home"
    instance = temp_instance(home)
    config = demo_config(demo_paths, benchmarks)
    run_graph(home, config, instance=instance)
    # the check ran in the CLI's runs, after each partitioned step
    for asset in ("training_gradients", "validation_gradients", "task_influence"):
        assert check_status(instance, asset, STALE_CHECK) == "SUCCEEDED", asset

    reported, cursor = tick(instance, build_definitions(home, config))
    partitioned = {"training_gradients", "validation_gradients", "task_influence", "ofa_embeddings", "finetuned_adapter", "benchmark_scores"}
    assert reported == {name: (True, []) for name in partitioned}  # the first tick reports every one
    assert tick(instance, build_definitions(home, config), cursor)[0] == {}  # nothing changed: nothing reported

    changed = config.replace(selection={"p": 0.5})  # in task_influence's settings only (its top-p threshold)
    reported, cursor = tick(instance, build_definitions(home, changed), cursor)
    assert reported == {"task_influence": (False, [BENCHMARK])}

    run_graph(home, changed, instance=instance)
    assert check_status(instance, "task_influence", STALE_CHECK) == "SUCCEEDED"
    assert tick(instance, build_definitions(home, changed), cursor)[0] == {"task_influence": (True, [])}
    assert instance.get_latest_materialization_event(AssetKey("task_influence")) is not None
