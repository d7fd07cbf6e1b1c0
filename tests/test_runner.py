"""The CLI's runs come from the asset graph: graph order, one partitions definition per run."""

from __future__ import annotations

from dagster import AssetIn, Definitions, asset

from icons_dagster.core.schema import IconsConfig
from icons_dagster.definitions import build_definitions, build_resources, graph_assets
from icons_dagster.partitions import benchmark_partitions, evaluation_method_partitions, shard_partitions
from icons_dagster.resources.refs import ALL_PARTITIONS
from icons_dagster.steps import plan_steps

CONFIG = IconsConfig().replace(data={"num_shards": 2})
SHARDS = ["shard-0000", "shard-0001"]


def labels(asset_graph, methods, ranges=(("a", "c"),), methods_keys=("full", "ofa")) -> list[str]:
    return [s.label for s in plan_steps(asset_graph, methods, {evaluation_method_partitions: list(methods_keys)}, list(ranges))]


def test_the_icons_graph_runs_as_head_shards_benchmark_ranges_then_the_vote():
    graph = build_definitions("/tmp/unused-home", CONFIG).resolve_asset_graph()
    assert labels(graph, ("icons",), ranges=[("a", "b"), ("d", "d")]) == [
        "training_pool + warmup_subset + warmup_checkpoint",
        *[f"training_gradients[{s}]" for s in SHARDS],
        "validation_gradients + task_influence[a...b]",
        "validation_gradients + task_influence[d]",
        "vote_table + selected_subset",
    ]
    assert labels(graph, ("ofa",)) == ["training_pool", *[f"ofa_embeddings[{s}]" for s in SHARDS], "ofa_pseudo_labels + ofa_selector + ofa_selected_subset"]
    everything = labels(graph, ("icons", "ofa", "evaluation"))
    assert everything[-3:] == ["finetuned_adapter + benchmark_scores[full]", "finetuned_adapter + benchmark_scores[ofa]", "evaluation_table"]
    assert "vote_table + selected_subset + evaluation_subsets" in everything
    # visual_dependency serves the evaluation: it runs with the head there, never for the selection alone
    assert everything[0] == "training_pool + warmup_subset + warmup_checkpoint + visual_dependency"
    assert not any("visual_dependency" in step for step in labels(graph, ("icons",)) + labels(graph, ("ofa",)))
    assert [s.tags()["dagster/asset_partition_range_end"] for s in plan_steps(graph, ("icons",), {}, [("a", "c")]) if s.partition_range] == ["c"]


def test_a_new_asset_needs_no_edit_to_be_run_in_order():
    """Assets added to the graph land in the right run by their partitions and upstream alone."""

    @asset(group_name="icons", partitions_def=shard_partitions(2))
    def shard_summary(training_gradients: dict) -> dict:
        return {}

    @asset(group_name="icons")
    def subset_report(selected_subset: dict) -> dict:
        return {}

    @asset(group_name="icons", partitions_def=benchmark_partitions, ins={"vote_table": AssetIn()})
    def per_benchmark_after_vote(vote_table: dict) -> dict:
        return {}

    @asset(group_name="icons", ins={"shard_summary": AssetIn(metadata=ALL_PARTITIONS)})
    def summary_of_shards(shard_summary: dict) -> dict:
        return {}

    extra = [shard_summary, subset_report, per_benchmark_after_vote, summary_of_shards]
    defs = Definitions(assets=[*graph_assets(CONFIG), *extra], resources=build_resources("/tmp/unused-home", CONFIG))
    steps = labels(defs.resolve_asset_graph(), ("icons",))
    assert steps[1:3] == [f"training_gradients + shard_summary[{s}]" for s in SHARDS]
    # an unpartitioned asset of all shards runs once, after every shard run (with the vote here)
    assert [i for i, step in enumerate(steps) if "summary_of_shards" in step] == [len(steps) - 2]
    assert steps[-2].endswith("vote_table + selected_subset + subset_report")
    assert steps[-1] == "per_benchmark_after_vote[a...c]"  # a benchmark partition after the vote: a run of its own
