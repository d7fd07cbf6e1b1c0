"""The ``evaluation`` group end to end on the test-size demo: subsets, fine-tunes, scores, Rel. table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from icons_dagster.core.selection.consensus import select, subset_size
from icons_dagster.core.evaluation.metrics import chance_threshold
from icons_dagster.core.evaluation.methods import DEFAULT_METHODS, parse_method
from icons_dagster.core.evaluation.statistics import align_record_scores, bootstrap_rel_differences, format_interval
from icons_dagster.core.stages.evaluation import BOOTSTRAP_SEED, INTERVALS_FILE, RECORD_SCORES_FILE, SCORES_FILE, SUBSETS_FILE, TABLE_FILE
from icons_dagster.runner import run_graph
from icons_dagster.core.storage.artifacts import ArtifactStore
from graph_helpers import demo_config, latest_metadata, temp_instance

RANDOMS = [m for m in DEFAULT_METHODS if parse_method(m).kind == "random"]
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
    # the random row is the mean of the seeds
    seeds = [dict(table.filter(pl.col("method") == m).select("benchmark", "score").iter_rows()) for m in RANDOMS]
    mean = dict(table.filter(pl.col("method") == "random (mean)").select("benchmark", "score").iter_rows())
    for b in full:
        assert mean[b] == pytest.approx(sum(s[b] for s in seeds) / len(seeds))
    markdown = Path(summary["evaluation_table"]).read_text()
    assert "| full |" in markdown and "Rel." in markdown
    assert latest_metadata(instance, "evaluation_table")["rel"]["full"] == pytest.approx(1.0)


def test_table_gives_each_method_its_rel_difference_to_random_with_a_paired_interval(evaluated):
    """Per-record scores are kept by every method's scores; the table's intervals are the
    statistics module's on them (2000 resamples, seed 0), beside Rel. all in the Markdown."""
    home, instance, summary = evaluated
    store = ArtifactStore(home)
    per_record = {}
    for method in DEFAULT_METHODS:
        ref = store.read_ref("benchmark_scores", method)
        frame = pl.read_parquet(home / ref.path / RECORD_SCORES_FILE)
        assert frame.columns == ["benchmark", "id", "score"]
        means = dict(frame.group_by("benchmark").agg(pl.col("score").mean()).iter_rows())
        assert means == pytest.approx(ref.scores), method  # a benchmark's score is its records' mean
        per_record[method] = {b: (g["id"].to_list(), g["score"].to_numpy()) for (b,), g in frame.group_by(["benchmark"])}
    table_ref = store.read_ref("evaluation_table")
    expected = bootstrap_rel_differences(align_record_scores(per_record), random_methods=RANDOMS, resamples=2000, seed=BOOTSTRAP_SEED)
    assert set(table_ref.rel_all_vs_random) == set(DEFAULT_METHODS)
    for method, interval in expected.items():
        assert table_ref.rel_all_vs_random[method] == pytest.approx(interval), method
    mean_random = sum(table_ref.rel_all[m] for m in RANDOMS) / len(RANDOMS)
    assert table_ref.rel_all_vs_random["icons"]["difference"] == pytest.approx(table_ref.rel_all["icons"] - mean_random)
    assert set(table_ref.rel_vs_random) == (set(DEFAULT_METHODS) if table_ref.rel_benchmarks else set())
    intervals = pl.read_parquet(home / table_ref.path / INTERVALS_FILE).filter(pl.col("measure") == "rel_all")
    icons = intervals.filter(pl.col("method") == "icons").row(0, named=True)
    assert (icons["difference"], icons["low"], icons["high"]) == pytest.approx(tuple(expected["icons"].values()))
    assert icons["beats_random"] == (expected["icons"]["low"] > 0)
    lines = Path(summary["evaluation_table"]).read_text().splitlines()
    assert lines[0].endswith("| Rel. all (%) | Δ Rel. vs random (95% CI) | Δ Rel. all vs random (95% CI) |")
    icons_row = next(line for line in lines if line.startswith("| icons |"))
    assert icons_row.endswith(f"| {format_interval(expected['icons'])} |")
    assert next(line for line in lines if line.startswith("| random (mean) |")).endswith("| – | – |")
    assert latest_metadata(instance, "evaluation_table")["bootstrap_resamples"] == 2000


def test_visual_dependency_scores_the_pool_at_the_warmup_checkpoint(evaluated, demo_records):
    """The evaluation group's visual_dependency: a row per pool record in pool order, null for
    the text-only ones, its metadata per family, and a subset's mean for the analysis."""
    from icons_dagster.core.stages.visual_dependency import load_visual_dependency, mean_visual_dependency

    home, instance, _ = evaluated
    store = ArtifactStore(home)
    ref = store.read_ref("visual_dependency")
    frame = load_visual_dependency(store, ref)
    assert frame["id"].to_list() == [r.id for r in demo_records]
    text_only = {r.id for r in demo_records if r.image_path is None}
    assert len(text_only) == 12 and set(frame.filter(pl.col("status") == "text_only")["id"]) == text_only
    scored = frame.filter(pl.col("status") == "scored")
    assert scored.height == len(demo_records) - 12 and scored["vds"].null_count() == 0
    assert frame.filter(pl.col("status") != "scored")["vds"].null_count() == 12
    assert scored["vds"].to_list() == scored.select(pl.col("loss_noise") - pl.col("loss_image"))["loss_noise"].to_list()
    assert (ref.n_records, ref.n_scored) == (len(demo_records), scored.height)
    assert ref.checkpoint == store.read_ref("warmup_checkpoint").checkpoints[-1]["index"]
    metadata = latest_metadata(instance, "visual_dependency")
    assert (metadata["n"], metadata["n_text_only"], metadata["n_skipped"]) == (len(demo_records), 12, 0)
    assert metadata["mean_vds"] == pytest.approx(scored["vds"].cast(pl.Float64).mean())
    assert metadata["median_vds"] == pytest.approx(scored["vds"].cast(pl.Float64).median())
    assert set(metadata["inputs"]) == {"training_pool", "warmup_checkpoint"}
    families = {json.loads(r.raw_json)["family"] for r in demo_records}
    by_family = metadata["mean_vds_by_family"]
    assert set(by_family) == families and sum(g["n"] for g in by_family.values()) == len(demo_records)
    assert all(g["mean_vds"] is None for name, g in by_family.items() if g["n_scored"] == 0)
    assert metadata["table"].startswith("| family | records | scored | mean VDS |")
    # what the evaluation's subset composition reads: the mean over the subset's scored records
    icons = _subsets(home).filter(pl.col("method") == "icons")["id"].to_list()
    expected = scored.filter(pl.col("id").is_in(icons))["vds"].cast(pl.Float64).mean()
    assert mean_visual_dependency(store, ref, icons) == pytest.approx(expected)
    # ... and the evaluation table reports it beside each family's share
    composition = {row["method"]: row for row in store.read_manifest(store.absolute(store.read_ref("evaluation_table").path))["metadata"]["composition"]}
    assert composition["icons"]["mean_vds"] == pytest.approx(expected) and composition["icons"]["n"] == len(icons)
    assert composition["pool"]["n"] == len(demo_records) and composition["pool"]["wrong_share"] is None


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


def test_table_stage_on_hand_scores_and_its_refusals(tmp_path):
    """The table stage alone, on per-record scores written by hand: the columns appear with
    random seeds, not without them, and scores from before per-record scores are refused."""
    from icons_dagster.core.evaluation.methods import EvaluationConfig
    from icons_dagster.core.stages.evaluation import stage_evaluation_table
    from icons_dagster.core.storage.refs import EvaluationSubsetsRef, ScoresRef

    store = ArtifactStore(tmp_path)
    records = {  # two benchmarks of four records, no chance level (token F1-like): both informative
        "full": {"x": [1.0, 1, 0, 0], "y": [1.0, 1, 1, 0]},
        "random-0": {"x": [1.0, 0, 0, 0], "y": [1.0, 0, 0, 0]},
        "random-1": {"x": [1.0, 1, 0, 0], "y": [0.0, 0, 0, 0]},
        "icons": {"x": [1.0, 1, 1, 0], "y": [1.0, 1, 1, 1]},
    }
    refs = {}
    for method, by_benchmark in records.items():
        folder = tmp_path / "scores" / method
        folder.mkdir(parents=True)
        rows = [{"benchmark": b, "id": f"{b}{i}", "score": s} for b, scores in by_benchmark.items() for i, s in enumerate(scores)]
        pl.DataFrame(rows).write_parquet(folder / RECORD_SCORES_FILE)
        means = {b: sum(s) / len(s) for b, s in by_benchmark.items()}
        refs[method] = ScoresRef("benchmark_scores", method, f"scores/{method}", method=method, scores=means, chance=dict.fromkeys(means), n=dict.fromkeys(means, 4))
    subsets = EvaluationSubsetsRef("evaluation_subsets", "s", "subsets")
    result = stage_evaluation_table(store, refs, subsets, EvaluationConfig(bootstrap_resamples=200))
    # Rel.: random-0 5/12, random-1 1/2, icons 17/12 (tests/test_statistics.py): 23/24 above their mean
    assert result.ref.rel_vs_random["icons"]["difference"] == pytest.approx(23 / 24)
    assert result.ref.rel_all_vs_random == result.ref.rel_vs_random  # every benchmark is informative
    lines = result.metadata["table"].splitlines()
    assert lines[0] == "| Method | x | y | Rel. (%) | Rel. all (%) | Δ Rel. vs random (95% CI) | Δ Rel. all vs random (95% CI) |"
    icons = result.ref.rel_vs_random["icons"]
    assert format_interval(icons).startswith("+95.8 (")
    assert lines[5] == f"| icons | 0.750 | 1.000 | 141.7 | 141.7 | {format_interval(icons)} | {format_interval(icons)} |"
    assert lines[6].startswith("| random (mean) |") and lines[6].endswith("| – | – |")
    intervals = pl.read_parquet(store.absolute(result.ref.path) / INTERVALS_FILE)
    assert intervals.height == 8 and set(intervals["measure"]) == {"rel", "rel_all"}
    assert result.metadata["beats_random"]["rel"] == [m for m in records if result.ref.rel_vs_random[m]["low"] > 0]
    # a different number of resamples is another table; without random seeds, no interval
    assert stage_evaluation_table(store, refs, subsets, EvaluationConfig(bootstrap_resamples=100)).ref.fingerprint != result.ref.fingerprint
    alone = stage_evaluation_table(store, {m: refs[m] for m in ("full", "icons")}, subsets, EvaluationConfig())
    assert alone.ref.rel_vs_random == {} and "Δ" not in alone.metadata["table"]
    (tmp_path / "scores" / "icons" / RECORD_SCORES_FILE).unlink()
    with pytest.raises(ValueError, match=r"benchmark_scores\[icons\] at scores/icons has no record_scores\.parquet .*materialize benchmark_scores again"):
        stage_evaluation_table(store, refs, subsets, EvaluationConfig(bootstrap_resamples=50))
