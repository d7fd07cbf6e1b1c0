"""Adding a benchmark recomputes only that benchmark; removing one retires it (real SQLite instance)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dagster import AssetKey, AssetRecordsFilter, SkipReason, build_sensor_context, evaluate_automation_conditions

from icons_dagster.assets import ICONS_ASSETS
from icons_dagster.automation import benchmark_folder_sensor
from icons_dagster.daemon_emulation import apply_benchmark_sensor, run_automation
from icons_dagster.definitions import build_definitions, build_resources
from icons_dagster.partitions import BENCHMARKS_PARTITION_NAME
from icons_dagster.runner import prepare_instance_home, run_graph
from graph_helpers import demo_config, sha, temp_instance

ASSET_KEYS = [a.key for a in ICONS_ASSETS]


def last_storage_id(instance) -> int:
    ids = [0]
    for key in ASSET_KEYS:
        records = instance.fetch_materializations(key, limit=1).records
        ids += [r.storage_id for r in records]
    return max(ids)


def materialized_since(instance, storage_id: int) -> list[str]:
    """Every materialization after ``storage_id`` as 'asset[partition]'."""
    found = []
    for key in ASSET_KEYS:
        records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, after_storage_id=storage_id), limit=1000).records
        for record in records:
            partition = record.event_log_entry.dagster_event.partition
            found.append(f"{key.to_user_string()}[{partition}]" if partition else key.to_user_string())
    return sorted(found)


def tick(instance, defs, resources) -> None:
    apply_benchmark_sensor(instance, ICONS_ASSETS, resources)


def automate(instance, defs, resources, cursor):
    return run_automation(instance, defs, ICONS_ASSETS, resources, cursor)


@pytest.fixture
def world(demo_paths, tmp_path):
    benchmarks = tmp_path / "benchmarks"
    for name in ("multiple_choice", "yes_no"):
        shutil.copytree(demo_paths.benchmarks / name, benchmarks / name)
    home = tmp_path / "home"
    instance = temp_instance(home)
    config = demo_config(demo_paths, benchmarks)
    run_graph(home, config, instance=instance)
    defs = build_definitions(home, config)
    resources = build_resources(home, config)
    cursor = evaluate_automation_conditions(defs, instance).cursor  # the baseline after the first fill
    return benchmarks, home, instance, config, defs, resources, cursor


def from_scratch_subset(demo_paths, folder: Path, names: list[str]) -> str:
    benchmarks = folder / "benchmarks"
    for name in names:
        shutil.copytree(demo_paths.benchmarks / name, benchmarks / name)
    summary = run_graph(folder, demo_config(demo_paths, benchmarks), instance=temp_instance(folder))
    return sha(summary["subset_json"])


def test_new_benchmark_recomputes_only_its_features_influence_and_the_vote(world, demo_paths, tmp_path):
    benchmarks, home, instance, config, defs, resources, cursor = world
    mark = last_storage_id(instance)
    shutil.copytree(demo_paths.benchmarks / "counting", benchmarks / "counting")
    tick(instance, defs, resources)
    assert sorted(instance.get_dynamic_partitions(BENCHMARKS_PARTITION_NAME)) == ["counting", "multiple_choice", "yes_no"]
    automate(instance, defs, resources, cursor)
    assert materialized_since(instance, mark) == [
        "selected_subset",
        "task_influence[counting]",
        "validation_gradients[counting]",
        "vote_table",
    ]
    expected = from_scratch_subset(demo_paths, tmp_path / "scratch3", ["counting", "multiple_choice", "yes_no"])
    assert sha(home / "exports" / "selected_subset.json") == expected


def test_two_new_benchmarks_are_batched_into_one_vote(world, demo_paths):
    benchmarks, _, instance, _, defs, resources, cursor = world
    mark = last_storage_id(instance)
    for name in ("counting", "long_answer"):
        shutil.copytree(demo_paths.benchmarks / name, benchmarks / name)
    tick(instance, defs, resources)
    automate(instance, defs, resources, cursor)
    done = materialized_since(instance, mark)
    assert done.count("vote_table") == 1 and done.count("selected_subset") == 1
    assert {"task_influence[counting]", "task_influence[long_answer]"} <= set(done)
    assert not any(item.startswith(("training_gradients", "warmup", "training_pool")) for item in done)
    # both benchmarks' features and influence in one run (one pass over the training features)
    runs = {
        record.run_id
        for name in ("validation_gradients", "task_influence")
        for record in instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey(name), after_storage_id=mark), limit=10).records
    }
    assert len(runs) == 1


def test_removed_benchmark_is_retired_and_artifacts_kept(world, demo_paths, tmp_path):
    benchmarks, home, instance, _, defs, resources, cursor = world
    kept = sorted((home / "artifacts" / "validation_gradients").rglob("yes_no"))
    mark = last_storage_id(instance)
    shutil.rmtree(benchmarks / "yes_no")
    tick(instance, defs, resources)
    assert instance.get_dynamic_partitions(BENCHMARKS_PARTITION_NAME) == ["multiple_choice"]
    automate(instance, defs, resources, cursor)
    assert materialized_since(instance, mark) == ["selected_subset", "vote_table"]
    assert kept and all(path.exists() for path in kept)
    assert sha(home / "exports" / "selected_subset.json") == from_scratch_subset(demo_paths, tmp_path / "scratch1", ["multiple_choice"])


def test_invalid_folder_is_reported_not_registered(world):
    benchmarks, _, instance, _, _, resources, _ = world
    (benchmarks / "broken").mkdir()
    (benchmarks / "broken" / "val.json").write_text("[{not json")
    (benchmarks / "empty").mkdir()
    result = benchmark_folder_sensor()(build_sensor_context(instance=instance, resources=resources))
    assert isinstance(result, SkipReason)
    assert "broken:" in result.skip_message and "malformed" in result.skip_message.lower()
    assert "empty: no val.json or val.jsonl" in result.skip_message
    assert sorted(instance.get_dynamic_partitions(BENCHMARKS_PARTITION_NAME)) == ["multiple_choice", "yes_no"]


def test_instance_home_limits_the_selection_pool_and_the_run_queue(tmp_path):
    import os

    from dagster import DagsterInstance

    prepare_instance_home(tmp_path)
    text = (tmp_path / "dagster" / "dagster.yaml").read_text()
    assert "default_limit: 1" in text
    instance = DagsterInstance.from_config(str(tmp_path / "dagster"))
    assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == os.cpu_count()  # the daemon's queue; no GPU here: one per core
    assert instance.event_log_storage.get_pool_config().default_pool_limit == 1
    assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 5
    assert instance.run_coordinator.dequeue_interval_seconds == 1  # bench/run_start_latency.py
    pools = {a.key.to_user_string(): set(a.node_def.pools) for a in ICONS_ASSETS}
    assert pools["vote_table"] == pools["selected_subset"] == {"icons_selection"}
    assert pools["training_gradients"] == set()


def test_contiguous_ranges_follow_the_registration_order():
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from icons_dagster.partitions import contiguous_ranges, partition_range_tags

    order = ["mme", "gqa", "vqav2", "pope", "mmb"]  # registration order, not sorted
    assert contiguous_ranges(order, ["pope", "gqa", "vqav2"]) == [("gqa", "pope")]
    assert contiguous_ranges(order, ["mme", "vqav2", "mmb"]) == [("mme", "mme"), ("vqav2", "vqav2"), ("mmb", "mmb")]
    assert contiguous_ranges(order, order) == [("mme", "mmb")]
    assert contiguous_ranges(order, []) == []
    with pytest.raises(ValueError, match="not registered as partitions: \\['textvqa'\\]"):
        contiguous_ranges(order, ["gqa", "textvqa"])
    # Dagster's own tags for a run over a partition range
    assert partition_range_tags("gqa", "pope") == {ASSET_PARTITION_RANGE_START_TAG: "gqa", ASSET_PARTITION_RANGE_END_TAG: "pope"}


def test_registering_tick_says_what_it_registered(world, demo_paths):
    """A tick that only adds partitions is recorded as skipped by Dagster: its message names them."""
    benchmarks, _, instance, _, _, resources, _ = world
    shutil.copytree(demo_paths.benchmarks / "counting", benchmarks / "counting")
    try:
        result = benchmark_folder_sensor()(build_sensor_context(instance=instance, resources=resources))
        assert not result.run_requests and result.dynamic_partitions_requests[0].partition_keys == ["counting"]
        assert "registered benchmarks ['counting']" in result.skip_reason.skip_message
    finally:
        shutil.rmtree(benchmarks / "counting")
