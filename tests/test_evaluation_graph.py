"""The ``evaluation`` group end to end on the test-size demo: subsets, fine-tunes, scores, Rel. table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from icons_dagster.core.selection.consensus import select, subset_size
from icons_dagster.core.evaluation.metrics import chance_threshold
from icons_dagster.core.evaluation.methods import DEFAULT_METHODS
from icons_dagster.core.stages.evaluation import SCORES_FILE, SUBSETS_FILE, TABLE_FILE
from icons_dagster.runner import run_graph
from icons_dagster.core.storage.artifacts import ArtifactStore
from graph_helpers import demo_config, latest_metadata, temp_instance

EXPECTED_METRICS = {
    "counting": "exact_match",
    "long_answer": "token_f1",
    "multiple_choice": "accuracy",
    "text_in_image": "exact_match",
    "vqa_short": "exact_match",
    "yes_no": "accuracy",
}


@pytest.fixture(scope="module")
def evaluated(demo_paths, tmp_path_factory):
    home = tmp_path_factory.mktemp("eval_home")
    instance = temp_instance(home)
    summary = run_graph(home, demo_config(demo_paths, demo_paths.benchmarks), instance=instance, methods=("icons", "ofa", "evaluation"))
    return home, instance, summary


def _subsets(home: Path) -> pl.DataFrame:
    return pl.read_parquet(home / ArtifactStore(home).read_ref("evaluation_subsets").path / SUBSETS_FILE)


def test_each_method_trains_on_its_own_selection(evaluated, demo_records):
    home, _, _ = evaluated
    subsets = _subsets(home)
    by_method = {m: subsets.filter(pl.col("method") == m)["id"].to_list() for m in DEFAULT_METHODS}
    n = len(demo_records)
    assert len(by_method["full"]) == n
    m = subset_size(n, 0.2)
    assert all(len(by_method[k]) == m for k in DEFAULT_METHODS if k not in ("full", "specialist"))
    # the evaluated ICONS and OFA subsets are the ones the selectors exported
    icons = pl.read_parquet(home / "exports" / "selected_subset.parquet").filter(pl.col("selected"))["id"]
    ofa = pl.read_parquet(home / "exports" / "ofa_selected_subset.parquet").filter(pl.col("selected"))["id"]
    assert set(by_method["icons"]) == set(icons.to_list())
    # the paper's rule is the vote without the coverage reserve (the default reserves 0.5)
    votes_frame = pl.read_parquet(home / ArtifactStore(home).read_ref("vote_table").path / "vote_table.parquet")
    scores = votes_frame.select(pl.selectors.starts_with("influence__")).to_numpy()
    paper = select(votes_frame["id"].to_list(), scores, 0.2, coverage=0.0)
    assert set(by_method["icons-paper"]) == set(votes_frame.filter(pl.Series(paper.selected))["id"])
    assert set(by_method["icons-cover-50"]) == set(by_method["icons"])
    assert set(by_method["ofa"]) == set(ofa.to_list())
    # three random seeds draw three different subsets
    assert len({tuple(sorted(by_method[f"random-{s}"])) for s in range(3)}) == 3
    # a specialist per benchmark: that benchmark's own top m records by its influence alone
    votes = pl.read_parquet(home / ArtifactStore(home).read_ref("vote_table").path / "vote_table.parquet")
    specialists = subsets.filter(pl.col("method") == "specialist")
    assert sorted(specialists["part"].unique()) == sorted(EXPECTED_METRICS)
    for benchmark, group in specialists.group_by("part"):
        top = votes.sort([f"influence__{benchmark[0]}", "id"], descending=[True, False]).head(m)
        # ties at the cut are broken by id hash, so compare the records strictly above the cut
        cut = top[f"influence__{benchmark[0]}"][-1]
        assert set(top.filter(pl.col(f"influence__{benchmark[0]}") > cut)["id"]) <= set(group["id"])
        assert group.height == m
    # the coverage variant keeps every benchmark's top floor(0.5 m / K) records; the plain vote need not
    quota = int(0.5 * m / len(EXPECTED_METRICS))
    for benchmark in EXPECTED_METRICS:
        top = votes.sort(f"influence__{benchmark}", descending=True).head(quota)
        assert set(top["id"]) <= set(by_method["icons-cover-50"]), benchmark


def test_one_recipe_one_epoch_per_method(evaluated, demo_records):
    home, instance, _ = evaluated
    full = latest_metadata(instance, "finetuned_adapter", "full")
    assert full["n_records"] == len(demo_records)
    assert full["steps"] == math.ceil(len(demo_records) / 4)  # one epoch at batch 4
    icons = latest_metadata(instance, "finetuned_adapter", "icons")
    assert icons["steps"] == math.ceil(subset_size(len(demo_records), 0.2) / 4)
    specialist = latest_metadata(instance, "finetuned_adapter", "specialist")
    assert specialist["steps"] == {b: icons["steps"] for b in EXPECTED_METRICS}  # one LoRA per benchmark


def test_every_benchmark_scored_with_the_metric_that_fits(evaluated):
    home, _, _ = evaluated
    ref = ArtifactStore(home).read_ref("benchmark_scores", "full")
    scores = json.loads((home / ref.path / SCORES_FILE).read_text())
    assert {name: s["metric"] for name, s in scores.items()} == EXPECTED_METRICS
    chance = {"yes_no": 0.5, "multiple_choice": 0.25}  # two and four candidates per record
    for name, s in scores.items():
        assert 0.0 <= s["score"] <= 1.0 and s["n"] == 8, name
        if name in chance:
            assert s["chance"] == pytest.approx(chance[name]), name
        if s["metric"] == "token_f1":
            assert s["chance"] is None
        assert s["reference_loss"] > 0.0


def test_table_has_every_method_and_rel_relative_to_full(evaluated):
    home, instance, summary = evaluated
    table = pl.read_parquet(home / ArtifactStore(home).read_ref("evaluation_table").path / TABLE_FILE)
    assert set(table["method"].unique()) == {*DEFAULT_METHODS, "random (mean)"}
    rel = summary["rel"]
    table_ref = ArtifactStore(home).read_ref("evaluation_table")
    # Rel. all (eq. 2) recomputed from the table: mean over benchmarks with a non-zero full score
    full = dict(table.filter(pl.col("method") == "full").select("benchmark", "score").iter_rows())
    icons = dict(table.filter(pl.col("method") == "icons").select("benchmark", "score").iter_rows())
    kept = [b for b in full if full[b] > 0]
    assert table_ref.rel_all["full"] == pytest.approx(1.0)
    assert table_ref.rel_all["icons"] == pytest.approx(sum(icons[b] / full[b] for b in kept) / len(kept))
    # Rel. over the benchmarks where full beats chance, as the table's in_rel column marks them
    used = table_ref.rel_benchmarks
    assert sorted(table.filter(pl.col("in_rel") & (pl.col("method") == "full"))["benchmark"].to_list()) == sorted(used)
    scores = json.loads((home / ArtifactStore(home).read_ref("benchmark_scores", "full").path / SCORES_FILE).read_text())
    for name in full:  # the rule, from each benchmark's chance level and size
        level = scores[name]["chance"]
        beats = full[name] > 0 if level is None else full[name] > chance_threshold(level, scores[name]["n"])
        assert (name in used) == beats, name
    if used:
        assert rel["full"] == pytest.approx(1.0)
        assert rel["icons"] == pytest.approx(sum(icons[b] / full[b] for b in used) / len(used))
    else:
        assert rel == {}
    # the random row is the mean of the three seeds
    seeds = [dict(table.filter(pl.col("method") == f"random-{s}").select("benchmark", "score").iter_rows()) for s in range(3)]
    mean = dict(table.filter(pl.col("method") == "random (mean)").select("benchmark", "score").iter_rows())
    for b in full:
        assert mean[b] == pytest.approx(sum(s[b] for s in seeds) / 3)
    markdown = Path(summary["evaluation_table"]).read_text()
    assert "| full |" in markdown and "Rel." in markdown
    assert latest_metadata(instance, "evaluation_table")["rel"]["full"] == pytest.approx(1.0)


def test_method_subsets_by_hand():
    from icons_dagster.core.evaluation.methods import EvaluationConfig
    from icons_dagster.core.stages.evaluation import method_subset

    ids = [f"r{i}" for i in range(10)]
    votes = pl.DataFrame({"id": ids, "influence__a": [float(i) for i in range(10)], "influence__b": [float(-i) for i in range(10)]})
    # "max" of the raw scores: max(i, -i) = i, so the top 2 are r9 and r8
    assert sorted(method_subset("icons-max", ids, 0.2, votes, None)) == ["r8", "r9"]
    # the vote gives r0, r1, r8, r9 one vote each and equal rank sums (i + 9 - i): the id hash
    # decides; icons-cover-100 reserves floor(1.0 * 2 / 2) = 1 place per benchmark: r9 (a), r0 (b)
    assert sorted(method_subset("icons-cover-100", ids, 0.2, votes, None)) == ["r0", "r9"]
    assert len(set(method_subset("icons-paper", ids, 0.2, votes, None)) & {"r0", "r1", "r8", "r9"}) == 2
    assert method_subset("random-4", ids, 0.3, None, None) == method_subset("random-4", ids, 0.3, None, None)
    assert len(method_subset("random-4", ids, 0.3, None, None)) == 3
    ofa = pl.DataFrame({"id": ids, "selected": [i < 3 for i in range(10)]})
    assert method_subset("ofa", ids, 0.3, None, {"ofa": ofa}) == ["r0", "r1", "r2"]
    with pytest.raises(ValueError, match="ofa.p"):
        method_subset("ofa", ids, 0.2, None, {"ofa": ofa})
    with pytest.raises(ValueError, match="selection.p"):
        method_subset("icons", ids, 0.2, None, {"icons": ofa})
    assert EvaluationConfig(epochs=1).recipe(20, 100).epochs == 1  # the paper's recipe: one epoch per subset
    assert EvaluationConfig(epochs=1, equal_steps=True).recipe(20, 100).epochs == 5  # 100 / 20
    assert EvaluationConfig(epochs=2, equal_steps=True).recipe(100, 100).epochs == 2
    for bad in ("greedy", "icons-cover-0", "icons-cover-101", "icons-cover-x"):
        with pytest.raises(ValueError, match="unknown evaluation method"):
            EvaluationConfig(methods=("full", bad))
    with pytest.raises(ValueError, match="'full'"):
        EvaluationConfig(methods=("icons",))


def test_subsets_report_overlap_coverage_and_family_shares(evaluated):
    home, instance, _ = evaluated
    metadata = latest_metadata(instance, "evaluation_subsets")
    overlap = metadata["method_overlap"]
    assert overlap["icons"]["icons"] == 1.0
    # the ICONS vote subset keeps, by construction, every sample with the top vote count;
    # its coverage of each benchmark's voters is at least as high as a random draw's on average
    coverage = metadata["benchmark_coverage"]
    mean = {m: sum(c.values()) / len(c) for m, c in coverage.items()}
    assert mean["icons"] > (mean["random-0"] + mean["random-1"] + mean["random-2"]) / 3
    shares = metadata["family_shares"]
    assert all(abs(sum(s.values()) - 1.0) < 1e-2 for s in shares.values())
    assert set(shares) == {m for m in DEFAULT_METHODS if m != "specialist"} | {f"specialist:{b}" for b in EXPECTED_METRICS}


def test_direct_merge_is_the_size_weighted_mean_of_influences():
    from icons_dagster.core.stages.evaluation import direct_merge_scores

    votes = pl.DataFrame({"id": ["a", "b"], "influence__x": [0.3, -0.1], "influence__y": [0.0, 0.5]})
    # x has 3 validation records, y has 1: (3 * 0.3 + 1 * 0.0) / 4 and (3 * -0.1 + 0.5) / 4
    assert direct_merge_scores(votes, {"x": 3, "y": 1}).tolist() == pytest.approx([0.225, 0.05])


def test_text_similarity_prefers_the_records_that_read_like_each_benchmark():
    from icons_dagster.core.stages.evaluation import text_similarity_scores

    pool = ["Is there a red square? Yes", "How many circles are there? three", "Describe the image in detail. A cat."]
    names, scores = text_similarity_scores(pool, {"count": ["How many squares are there? two"], "yn": ["Is there a blue circle? No"]})
    assert names == ["count", "yn"]
    assert scores.shape == (3, 2)
    assert scores[:, 0].argmax() == 1 and scores[:, 1].argmax() == 0
    assert (scores >= 0).all() and (scores <= 1 + 1e-9).all()
