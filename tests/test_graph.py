"""The whole asset graph on a persistent temp Dagster instance (the test ladder's top rungs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetKey, materialize

from icons_dagster.assets import ICONS_ASSETS
from icons_dagster.assets.evaluation import EVALUATION_ASSETS
from icons_dagster.assets.ofa import OFA_ASSETS
from icons_dagster.core.selection.consensus import subset_size
from icons_dagster.core.storage.fingerprint import ALGORITHM_VERSION
from icons_dagster.definitions import build_definitions, build_resources
from icons_dagster.core.schema import IconsConfig
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.demo.bootstrap import demo_settings
from icons_dagster.partitions import BENCHMARKS_PARTITION_NAME
from icons_dagster.runner import run_graph
from graph_helpers import check_status, demo_config, latest_metadata, sha, shards_of, temp_instance

BENCHMARKS = ("multiple_choice", "yes_no")


@pytest.fixture(scope="module")
def two_benchmarks(demo_paths, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("benchmarks")
    for name in BENCHMARKS:
        shutil.copytree(demo_paths.benchmarks / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def first_run(demo_paths, two_benchmarks, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    instance = temp_instance(home)
    config = demo_config(demo_paths, two_benchmarks)
    summary = run_graph(home, config, instance=instance)
    summary["hashes"] = {name: sha(summary[name]) for name in ("subset_json", "subset_parquet")}
    summary["feature_hashes"] = feature_hashes(home)
    return home, instance, config, summary


def feature_hashes(home: Path) -> dict[str, str]:
    """sha256 of every shard's and benchmark's current feature file, by partition."""
    hashes = {}
    for asset in ("training_gradients", "validation_gradients"):
        for ref_file in sorted((home / "refs" / asset).glob("*.json")):
            folder = home / json.loads(ref_file.read_text())["path"]
            hashes[f"{asset}/{ref_file.stem}"] = sha(folder / "features-checkpoint-0.npy")
    return hashes


def test_definitions_load_with_every_asset():
    defs = build_definitions("/tmp/unused-home", IconsConfig.from_json(demo_settings(data={"num_shards": 3})))
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == {a.key.to_user_string() for a in [*ICONS_ASSETS, *OFA_ASSETS, *EVALUATION_ASSETS]}
    assert defs.resolve_job_def("register_benchmarks_job") is not None
    # the shard count comes from the configuration: every shard-partitioned asset and the shard job
    for name in ("training_gradients", "ofa_embeddings"):
        assert graph.get(AssetKey(name)).partitions_def.get_partition_keys() == ["shard-0000", "shard-0001", "shard-0002"]
    assert defs.resolve_job_def("training_gradients_job").partitions_def.get_partition_keys() == ["shard-0000", "shard-0001", "shard-0002"]
    # what a Dagster user looks for: kinds on every asset, a description on every check, Markdown descriptions
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.kinds and node.description and "``" not in node.description, key
    assert all(graph.get(check).description for check in graph.asset_check_keys)
    assert all(not graph.get(key).owners for key in graph.get_all_asset_keys())  # none unless the catalog names them


def test_the_catalog_section_gives_every_asset_its_owners_and_tags():
    catalog = {"owners": ["team:data-curation", "ana@example.org"], "tags": {"domain": "vlm-data"}}
    defs = build_definitions("/tmp/unused-home", IconsConfig.from_json(demo_settings(catalog=catalog)))
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.owners == catalog["owners"] and node.tags["domain"] == "vlm-data", key
    with pytest.raises(ValueError, match="catalog.owners: 'curation' is neither"):
        IconsConfig.from_json(demo_settings(catalog={"owners": ["curation"]}))


def test_whole_graph_materializes_and_subset_loads(first_run, demo_paths):
    home, instance, _, summary = first_run
    assert sorted(instance.get_dynamic_partitions(BENCHMARKS_PARTITION_NAME)) == sorted(BENCHMARKS)
    subset = json.loads(Path(summary["subset_json"]).read_text())
    pool = json.loads(Path(demo_paths.pool).read_text())
    assert len(subset) == subset_size(len(pool), 0.2)
    # Original records, untouched.
    by_id = {r["id"]: r for r in pool}
    assert all(record == by_id[record["id"]] for record in subset)
    # Every shard and benchmark partition was materialized in this instance.
    shards = shards_of(first_run[2])
    materialized = instance.get_materialized_partitions(AssetKey("training_gradients"))
    assert materialized == set(shards)
    assert instance.get_materialized_partitions(AssetKey("task_influence")) == set(BENCHMARKS)
    subset_meta = latest_metadata(instance, "selected_subset")
    assert subset_meta["n_selected"] == len(subset)
    assert subset_meta["dagster/row_count"] == len(pool) and "reason" in [c.name for c in subset_meta["dagster/column_schema"].columns]  # every pool record, in or out, with its reason
    assert latest_metadata(instance, "training_pool")["dagster/row_count"] == len(pool)
    assert "plot_votes_histogram" in subset_meta
    # every step's seconds is its whole wall time, the artifact's build (compute_seconds) inside it
    for name, partition in [("training_pool", None), ("warmup_checkpoint", None), ("training_gradients", shards[0]), ("task_influence", BENCHMARKS[0])]:
        meta = latest_metadata(instance, name, partition)
        assert meta["seconds"] >= meta["compute_seconds"] > 0, name
    # long steps log their progress in the run
    messages = [e.user_message for run in instance.get_runs() for e in instance.all_logs(run.run_id)]
    for label in ("warm-up step:", f"training_gradients[{shards[0]}]:", "validation_gradients["):
        assert any(m.startswith(label) for m in messages), label


def test_benchmarks_share_one_run_and_keep_their_own_metadata(first_run):
    """The CLI materializes every benchmark's features in one run and their influence in one
    pass (a single-run backfill over the benchmark range), each partition with its own record."""
    home, instance, _, _ = first_run
    for asset in ("validation_gradients", "task_influence"):
        records = instance.fetch_materializations(AssetKey(asset), limit=100).records
        latest = {r.event_log_entry.dagster_event.partition: r for r in reversed(records)}  # newest wins
        assert set(latest) == set(BENCHMARKS)
        assert len({r.run_id for r in latest.values()}) == 1, asset
        for benchmark, record in latest.items():
            metadata = {k: v.value for k, v in record.asset_materialization.metadata.items()}
            ref = ArtifactStore(home).read_ref(asset, benchmark)
            assert metadata["benchmark"] == benchmark and metadata["fingerprint"] == ref.fingerprint
    run = instance.get_run_by_id(latest["yes_no"].run_id)
    assert run.tags["dagster/asset_partition_range_start"] == "multiple_choice"
    assert run.tags["dagster/asset_partition_range_end"] == "yes_no"
    # the run's one feature check reports every benchmark it covered
    key = AssetCheckKey(AssetKey("validation_gradients"), "features_finite_unit_norm")
    execution = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    checked = execution.event.dagster_event.event_specific_data.metadata
    assert {b: checked[b].value["passed"] for b in BENCHMARKS} == {b: True for b in BENCHMARKS}
    assert all(checked[b].value["max_norm_error"] <= checked[b].value["tolerance"] for b in BENCHMARKS)


def test_asset_checks_pass(first_run):
    _, instance, _, _ = first_run
    for asset, check in [
        ("training_gradients", "features_finite_unit_norm"),
        ("validation_gradients", "features_finite_unit_norm"),
        ("vote_table", "every_registered_benchmark_voted"),
        ("selected_subset", "subset_size"),
        ("selected_subset", "no_rejected_record"),
        ("training_pool", "manifest_well_formed"),
        ("warmup_checkpoint", "checkpoint_finite"),
        ("task_influence", "influence_finite_valid_ids"),
    ]:
        assert check_status(instance, asset, check) == "SUCCEEDED", (asset, check)


def test_specialists_are_enriched_in_their_own_family(first_run):
    """Each benchmark's specialist top-p holds more of its own task family than a random p
    would (the demo world's signal; the default demo's own run is bench/RESULTS' end-to-end demo)."""
    _, instance, _, summary = first_run
    for name in summary["benchmarks"]:
        meta = latest_metadata(instance, "task_influence", name)
        assert meta["specialist_family_enrichment"] > 1.0, (name, meta["specialist_family_enrichment"])
    assert latest_metadata(instance, "task_influence", "multiple_choice")["subtask_groups"] == ["color", "shape"]


def test_unchanged_rerun_recomputes_nothing(first_run):
    home, instance, config, summary = first_run
    artifacts = home / "artifacts"
    before = {p: p.stat().st_mtime_ns for p in artifacts.rglob("*") if p.is_file()}
    subset_hash = summary["hashes"]["subset_json"]
    run_graph(home, config, instance=instance)
    after = {p: p.stat().st_mtime_ns for p in artifacts.rglob("*") if p.is_file()}
    assert after == before
    for name in ("training_pool", "warmup_checkpoint", "vote_table", "selected_subset"):
        assert latest_metadata(instance, name)["reused"] is True
    assert sha(summary["subset_json"]) == subset_hash


def test_changed_projector_seed_writes_new_paths(first_run):
    home, instance, config, _ = first_run
    old_dirs = {p.name for p in (home / "artifacts" / "training_gradients").iterdir()}
    changed = config.replace(gradients={"seed": 1})
    run_graph(home, changed, instance=instance)
    new_dirs = {p.name for p in (home / "artifacts" / "training_gradients").iterdir()}
    assert len(new_dirs - old_dirs) == 1 and old_dirs <= new_dirs
    # The warm-up did not depend on the projector: it was reused.
    assert latest_metadata(instance, "warmup_checkpoint")["reused"] is True
    assert latest_metadata(instance, "training_gradients", shards_of(config)[0])["reused"] is False


def test_two_homes_give_byte_identical_subsets(first_run, demo_paths, two_benchmarks, tmp_path):
    _, _, config, summary = first_run
    instance = temp_instance(tmp_path)
    other = run_graph(tmp_path, config, instance=instance)
    assert sha(other["subset_json"]) == summary["hashes"]["subset_json"]
    assert sha(other["subset_parquet"]) == summary["hashes"]["subset_parquet"]
    assert feature_hashes(tmp_path) == summary["feature_hashes"]
    assert len(summary["feature_hashes"]) == len(shards_of(config)) + len(BENCHMARKS)


def test_single_benchmark_partition_still_reaches_vote_as_dict(demo_paths, two_benchmarks, tmp_path):
    """UPathIOManager hands over a bare object when one partition is mapped; ours keeps the dict."""
    instance = temp_instance(tmp_path)
    only = tmp_path / "one"
    shutil.copytree(two_benchmarks / "yes_no", only / "yes_no")
    summary = run_graph(tmp_path, demo_config(demo_paths, only), instance=instance)
    assert summary["benchmarks"] == ["yes_no"]
    assert latest_metadata(instance, "vote_table")["benchmarks"] == ["yes_no"]


def test_missing_shard_is_a_clear_error(demo_paths, two_benchmarks, tmp_path):
    instance = temp_instance(tmp_path)
    config = demo_config(demo_paths, two_benchmarks)
    resources = build_resources(tmp_path, config)
    instance.add_dynamic_partitions(BENCHMARKS_PARTITION_NAME, ["yes_no"])
    head = materialize(ICONS_ASSETS, selection=[AssetKey("training_pool"), AssetKey("warmup_subset"), AssetKey("warmup_checkpoint")], instance=instance, resources=resources)
    assert head.success
    result = materialize(
        ICONS_ASSETS,
        selection=[AssetKey("validation_gradients"), AssetKey("task_influence")],
        partition_key="yes_no",
        instance=instance,
        resources=resources,
        raise_on_error=False,
    )
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    error = failures[0].step_failure_data.error
    assert error.cause.cls_name == "FileNotFoundError"
    assert "training_gradients[shard-0000] has not been materialized yet" in error.cause.message


def test_code_versions_follow_exactly_the_settings_an_asset_depends_on():
    from icons_dagster.definitions import asset_code_versions

    base = IconsConfig.from_json(demo_settings())  # the evaluation has its own LoRA (r=64)
    own_lora = base.replace(evaluation={"lora_r": 0, "lora_alpha": 0})  # the evaluation tunes the warm-up's LoRA

    def changed(config, reference=base):
        before, after = asset_code_versions(reference), asset_code_versions(config)
        return {k for k, v in after.items() if v != before[k]}

    assert changed(base.replace(gradients={"seed": 9})) == {"training_gradients", "validation_gradients"}
    # the visual dependency's batches follow the gradients' (padding changes a loss's last bits)
    assert changed(base.replace(gradients={"batch_size": 4})) == {"training_gradients", "validation_gradients", "visual_dependency"}
    assert changed(base.replace(selection={"p": 0.3})) == {"task_influence", "vote_table", "selected_subset", "evaluation_subsets"}
    assert changed(base.replace(lora={"r": 16})) == {"warmup_checkpoint"}
    assert changed(own_lora.replace(lora={"r": 16}), own_lora) == {"warmup_checkpoint", "finetuned_adapter"}  # the model the evaluation tunes, too
    assert changed(base.replace(ofa={"num_clusters": 7})) == {"ofa_pseudo_labels", "ofa_selector"}
    assert changed(base.replace(evaluation={"epochs": 2})) == {"finetuned_adapter"}
    assert changed(base.replace(evaluation={"bootstrap_resamples": 500})) == {"evaluation_table"}
    assert changed(base.replace(data={"num_shards": 8})) == {"training_pool"}
    assert changed(base.replace(embedder={"batch_size": 8})) == set()  # speed, not what is computed
    assert asset_code_versions(base) == asset_code_versions(IconsConfig.from_json(base.to_json()))


def test_materializations_record_code_versions_and_lineage(first_run):
    _, instance, _, _ = first_run
    event = instance.get_latest_materialization_event(AssetKey("selected_subset"))
    tags = event.asset_materialization.tags
    assert tags.get("dagster/code_version", "").startswith(f"{ALGORITHM_VERSION}-")
    meta = latest_metadata(instance, "selected_subset")
    lineage = meta["lineage"]
    assert set(lineage["benchmark_content_sha256"]) == set(BENCHMARKS)
    assert lineage["checkpoints"][0]["weight"] == 1.0 and lineage["gradients"]["projector"] == "countsketch"
    assert set(meta["inputs"]) == {"vote_table", "training_pool"}


def test_cli_runs_are_named_jobs_of_one_invocation(first_run):
    """Every run of one run_graph call is a subset of a job of the code location the UI loads,
    with the origin the UI re-executes from, and carries the call's invocation tag."""
    from icons_dagster.jobs import CODE_LOCATION, REPOSITORY, asset_jobs
    from icons_dagster.steps import INVOCATION_TAG

    import icons_dagster.definitions

    assert CODE_LOCATION == icons_dagster.definitions.__name__  # the module the UI loads
    home, instance, config, summary = first_run
    runs = [run for run in instance.get_runs() if run.tags.get(INVOCATION_TAG) == summary["invocation"]]
    assert len(runs) == summary["steps"]
    jobs = asset_jobs(list(build_definitions(home, config).assets), config)
    for run in runs:
        assert run.asset_selection and {jobs[key.to_user_string()] for key in run.asset_selection} == {run.job_name}
        origin = run.remote_job_origin.repository_origin
        assert (origin.code_location_origin.location_name, origin.repository_name, run.remote_job_origin.job_name) == (CODE_LOCATION, REPOSITORY, run.job_name)
    assert {run.job_name for run in runs} == {"unpartitioned_assets_job", "per_shard_assets_job", "per_benchmark_assets_job"}


REEXECUTE = """
mutation ($parentRunId: String!) {
  launchPipelineReexecution(reexecutionParams: {parentRunId: $parentRunId, strategy: ALL_STEPS}) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}
"""
JOB = """
query ($selector: PipelineSelector!) { pipelineOrError(params: $selector) { __typename ... on Pipeline { name description } } }
"""
RUN = "query ($runId: ID!) { runOrError(runId: $runId) { ... on Run { status pipelineName repositoryOrigin { repositoryLocationName } } } }"


def test_ui_reexecutes_a_cli_run(first_run, monkeypatch):
    """The UI's GraphQL, over the code location ``icons-dagster ui`` serves, finds a CLI run's job
    and re-executes it (the vote step: reused artifacts, the same subset) in its own process."""
    import time

    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    from icons_dagster.jobs import CODE_LOCATION, REPOSITORY
    from icons_dagster.steps import INVOCATION_TAG

    home, instance, _, summary = first_run
    monkeypatch.setenv("ICONS_HOME", str(home))  # the code server loads the home's icons.json
    vote_run = next(run for run in instance.get_runs() if run.tags.get(INVOCATION_TAG) == summary["invocation"] and AssetKey("selected_subset") in run.asset_selection)
    subset_before = sha(summary["subset_json"])  # of the home's latest configuration (earlier tests change it)
    with WorkspaceProcessContext(instance, ModuleTarget(CODE_LOCATION, None, None, None)) as workspace:
        context = workspace.create_request_context()
        shown = execute_dagster_graphql(context, RUN, {"runId": vote_run.run_id}).data["runOrError"]
        assert shown["pipelineName"] == "unpartitioned_assets_job" and shown["repositoryOrigin"]["repositoryLocationName"] == CODE_LOCATION
        whole = {"pipelineName": "icons_graph_job", "repositoryName": REPOSITORY, "repositoryLocationName": CODE_LOCATION}
        listed = execute_dagster_graphql(context, JOB, {"selector": whole}).data["pipelineOrError"]
        assert listed["__typename"] == "Pipeline" and "whole graph" in listed["description"]  # on the Jobs page
        launched = execute_dagster_graphql(context, REEXECUTE, {"parentRunId": vote_run.run_id}).data["launchPipelineReexecution"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        instance.launch_run(run_id, context)  # what the daemon's run queue does with a queued run
        deadline = time.monotonic() + 180
        while not instance.get_run_by_id(run_id).is_finished and time.monotonic() < deadline:
            time.sleep(1)
    rerun = instance.get_run_by_id(run_id)
    assert rerun.is_success and rerun.parent_run_id == vote_run.run_id and rerun.asset_selection == vote_run.asset_selection
    assert latest_metadata(instance, "selected_subset")["reused"] is True and sha(summary["subset_json"]) == subset_before



def test_the_whole_graph_job_runs_the_clis_runs_tagged_with_its_own_id(first_run):
    """``icons_graph_job`` (the Jobs page's one click) runs every step of the graph as its own
    run of a named job, tagged with the job run's id; on a finished home each reuses its artifact.
    Executed as a run worker does: the job backed by its repository."""
    from dagster._core.definitions.job_base import RepoBackedJob
    from dagster._core.execution.api import execute_run

    from icons_dagster.graph_job import GRAPH_JOB
    from icons_dagster.resources.home import read_home_config
    from icons_dagster.run_guard import home_lock
    from icons_dagster.steps import INVOCATION_TAG

    home, instance, _, summary = first_run
    subset_before = sha(summary["subset_json"])
    repository = build_definitions(home, read_home_config(home)).get_repository_def()  # the home's latest configuration

    def launch(methods: list[str]):
        run_config = {"ops": {"materialize_whole_graph": {"config": {"methods": methods}}}}
        run = instance.create_run_for_job(repository.get_job(GRAPH_JOB), run_config=run_config)
        return execute_run(RepoBackedJob(GRAPH_JOB, repository), run, instance)

    result = launch(["icons"])
    assert result.success
    steps = [run for run in instance.get_runs() if run.tags.get(INVOCATION_TAG) == result.run_id]
    assert len(steps) == summary["steps"] and {run.job_name for run in steps} == {"unpartitioned_assets_job", "per_shard_assets_job", "per_benchmark_assets_job"}
    for run in steps:
        assert run.is_success
        materialized = [e.asset_materialization for e in instance.all_logs(run.run_id) if e.is_dagster_event and e.dagster_event.is_step_materialization]
        assert materialized and all(m.metadata["reused"].value is True for m in materialized), run.tags["icons/step"]
    assert sha(summary["subset_json"]) == subset_before
    # an unknown method fails the job with one line, not a traceback
    def failure(result) -> str:
        assert not result.success
        return next(e for e in result.all_events if e.is_step_failure).step_failure_data.user_failure_data.description

    assert "unknown method(s) ['nope']" in failure(launch(["nope"]))
    # the home is held as a CLI command holds it: one writer at a time
    with home_lock(ArtifactStore(home).dagster_home, "icons-dagster run"):
        assert "in use by 'icons-dagster run'" in failure(launch(["icons"]))
