"""The paired bootstrap of each method's Rel. difference to random (pre-registration, section 4)."""

from __future__ import annotations

import numpy as np
import pytest

from icons_dagster.core.evaluation.metrics import relative_scores
from icons_dagster.core.evaluation.statistics import align_record_scores, bootstrap_rel_differences, format_interval

RANDOMS = ["random-0", "random-1"]


def hand_case() -> dict[str, dict[str, np.ndarray]]:
    """Two benchmarks of four records; per-benchmark means in the comments."""
    return {
        "full": {"x": np.array([1.0, 1, 0, 0]), "y": np.array([1.0, 1, 1, 0])},  # 0.5, 0.75
        "random-0": {"x": np.array([1.0, 0, 0, 0]), "y": np.array([1.0, 0, 0, 0])},  # 0.25, 0.25
        "random-1": {"x": np.array([1.0, 1, 0, 0]), "y": np.array([0.0, 0, 0, 0])},  # 0.5, 0
        "icons": {"x": np.array([1.0, 1, 1, 0]), "y": np.array([1.0, 1, 1, 1])},  # 0.75, 1
    }


def test_point_estimate_by_hand_from_eq_2():
    result = bootstrap_rel_differences(hand_case(), random_methods=RANDOMS, resamples=50)
    # Rel(random-0) = (0.25/0.5 + 0.25/0.75) / 2 = 5/12; Rel(random-1) = (1 + 0) / 2 = 1/2;
    # their mean 11/24. Rel(icons) = (0.75/0.5 + 1/0.75) / 2 = 17/12; Rel(full) = 1.
    assert result["icons"]["difference"] == pytest.approx(17 / 12 - 11 / 24)  # 23/24
    assert result["full"]["difference"] == pytest.approx(1 - 11 / 24)
    assert result["random-0"]["difference"] == pytest.approx(5 / 12 - 11 / 24)
    # only benchmark x: Rel(icons) = 1.5, random mean (0.5 + 1) / 2 = 0.75
    only_x = bootstrap_rel_differences(hand_case(), random_methods=RANDOMS, benchmarks=["x"], resamples=50)
    assert only_x["icons"]["difference"] == pytest.approx(0.75)
    for method, d in result.items():
        assert d["low"] <= d["high"], method


def test_each_resample_is_eq_2_on_the_same_records_for_every_method():
    """A loop over resamples with the same draws, Rel. from metrics.relative_scores, gives the same interval."""
    rng = np.random.default_rng(7)
    n = {"a": 30, "b": 25, "c": 20}
    data = {m: {b: rng.random(k) * (0.6 if m != "full" else 1.0) for b, k in n.items()} for m in ["full", *RANDOMS, "icons"]}
    resamples = 200
    result = bootstrap_rel_differences(data, random_methods=RANDOMS, benchmarks=["a", "c"], resamples=resamples, seed=3)
    draws = np.random.Generator(np.random.PCG64(3))
    index = {b: draws.integers(0, n[b], size=(resamples, n[b])) for b in sorted(n)}  # every benchmark draws, in order
    differences = []
    for r in range(resamples):
        table = {m: {b: float(data[m][b][index[b][r]].mean()) for b in n} for m in data}
        rel = relative_scores(table, benchmarks=["a", "c"])
        differences.append(rel["icons"] - (rel["random-0"] + rel["random-1"]) / 2)
    assert result["icons"]["low"] == pytest.approx(np.percentile(differences, 2.5), abs=1e-12)
    assert result["icons"]["high"] == pytest.approx(np.percentile(differences, 97.5), abs=1e-12)
    point = relative_scores({m: {b: float(v.mean()) for b, v in d.items()} for m, d in data.items()}, benchmarks=["a", "c"])
    assert result["icons"]["difference"] == pytest.approx(point["icons"] - (point["random-0"] + point["random-1"]) / 2)
    assert result["icons"]["low"] < result["icons"]["difference"] < result["icons"]["high"]


def test_a_method_equal_to_the_random_mean_differs_by_zero_in_every_resample():
    case = hand_case()
    case["mean"] = {b: (case["random-0"][b] + case["random-1"][b]) / 2 for b in ("x", "y")}
    d = bootstrap_rel_differences(case, random_methods=RANDOMS, resamples=300)["mean"]
    assert (d["difference"], d["low"], d["high"]) == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    assert format_interval(d) == "+0.0 (+0.0, +0.0)"


def test_pairing_and_the_resampled_denominator_cancel_what_methods_share():
    """Paired: a method that is full, and a random seed that is half of full on every record,
    differ by exactly 0.5 in every resample (Rel. 1 and Rel. 0.5), however noisy full is;
    resampling each method on its own records, or keeping full's denominator fixed, would not."""
    rng = np.random.default_rng(0)
    full = {b: (rng.random(40) < 0.6).astype(float) for b in ("x", "y", "z")}
    data = {"full": full, "random-0": {b: v / 2 for b, v in full.items()}, "same-as-full": {b: v.copy() for b, v in full.items()}}
    d = bootstrap_rel_differences(data, random_methods=["random-0"], resamples=500)["same-as-full"]
    assert (d["difference"], d["low"], d["high"]) == pytest.approx((0.5, 0.5, 0.5), abs=1e-12)
    # a method that is random + 0.1 on every record, with a constant full (0.8): 0.1 / 0.8 in every resample
    noisy = {b: rng.random(40) * 0.5 for b in ("x", "y")}
    data = {"full": {b: np.full(40, 0.8) for b in noisy}, "random-0": noisy, "plus": {b: v + 0.1 for b, v in noisy.items()}}
    d = bootstrap_rel_differences(data, random_methods=["random-0"], resamples=500)["plus"]
    assert (d["difference"], d["low"], d["high"]) == pytest.approx((0.125, 0.125, 0.125), abs=1e-12)
    # the same scores resampled unpaired (each method its own records) spread widely
    draws = np.random.default_rng(1)
    unpaired = [
        np.mean([(data["plus"][b][draws.integers(0, 40, 40)].mean() - noisy[b][draws.integers(0, 40, 40)].mean()) / 0.8 for b in noisy])
        for _ in range(500)
    ]
    assert np.percentile(unpaired, 97.5) - np.percentile(unpaired, 2.5) > 0.1


def test_equal_seeds_give_equal_intervals_and_other_seeds_others():
    rng = np.random.default_rng(5)
    data = {m: {b: rng.random(50) for b in ("x", "y")} for m in ["full", *RANDOMS, "icons"]}
    first = bootstrap_rel_differences(data, random_methods=RANDOMS, resamples=400, seed=11)
    assert bootstrap_rel_differences(data, random_methods=RANDOMS, resamples=400, seed=11) == first
    other = bootstrap_rel_differences(data, random_methods=RANDOMS, resamples=400, seed=12)
    assert other["icons"]["difference"] == first["icons"]["difference"]  # the point estimate has no resampling
    assert (other["icons"]["low"], other["icons"]["high"]) != (first["icons"]["low"], first["icons"]["high"])


def test_records_are_aligned_on_ids_and_a_mismatch_is_named():
    per_record = {
        "full": {"x": (["a", "b", "c"], [1.0, 0.0, 1.0])},
        "icons": {"x": (["c", "a", "b"], [0.5, 0.25, 0.0])},
    }
    aligned = align_record_scores(per_record)
    assert aligned["icons"]["x"].tolist() == [0.25, 0.0, 0.5]  # in full's order a, b, c
    assert aligned["full"]["x"].tolist() == [1.0, 0.0, 1.0]
    per_record["random-0"] = {"x": (["a", "b", "d"], [1.0, 1.0, 1.0])}
    with pytest.raises(ValueError, match=r"random-0/x: the scored records differ from full's .*missing e\.g\. \['c'\], extra e\.g\. \['d'\]"):
        align_record_scores(per_record)
    per_record["random-0"] = {"y": (["a"], [1.0])}
    with pytest.raises(ValueError, match=r"random-0: no per-record scores for benchmark 'x'"):
        align_record_scores(per_record)
    unaligned = {"full": {"x": np.ones(3)}, "random-0": {"x": np.ones(2)}}
    with pytest.raises(ValueError, match=r"random-0/x: 2 per-record scores, full has 3: align them on record ids first"):
        bootstrap_rel_differences(unaligned, random_methods=["random-0"])
    with pytest.raises(ValueError, match=r"no 'full' method"):
        bootstrap_rel_differences({"random-0": {"x": np.ones(2)}}, random_methods=["random-0"])


def test_format_interval_in_points():
    assert format_interval({"difference": 0.031, "low": 0.004, "high": 0.059}) == "+3.1 (+0.4, +5.9)"
    assert format_interval({"difference": -0.0204, "low": -0.05, "high": 0.011}) == "-2.0 (-5.0, +1.1)"
    assert format_interval(None) == "–"
    assert format_interval({"difference": 0.1, "low": float("nan"), "high": float("nan")}) == "–"


def test_a_pooled_row_is_the_mean_of_its_methods_differences_in_the_data_and_in_each_resample():
    """One method over several pipeline seeds: the mean difference, and one interval from the same resamples."""
    data = hand_case() | {"icons@1": {"x": np.array([0.0, 1, 1, 0]), "y": np.array([1.0, 0, 1, 1])}}  # 0.5, 0.75: Rel. 1
    pooled = {"icons (mean of 2)": ["icons", "icons@1"], "icons alone": ["icons"]}
    result = bootstrap_rel_differences(data, random_methods=RANDOMS, resamples=300, pooled=pooled)
    # icons: 23/24 (above); icons@1: Rel. 1 - 11/24 = 13/24; their mean 18/24
    assert result["icons (mean of 2)"]["difference"] == pytest.approx(18 / 24)
    assert result["icons alone"] == result["icons"]
    # one resample: the interval is that resample's value, so the pooled row's is the members' mean
    for seed in range(5):
        one = bootstrap_rel_differences(data, random_methods=RANDOMS, resamples=1, seed=seed, pooled=pooled)
        assert one["icons (mean of 2)"]["low"] == pytest.approx((one["icons"]["low"] + one["icons@1"]["low"]) / 2)
    for bad, message in (({"p": []}, "no method"), ({"p": ["nope"]}, "unknown method"), ({"icons": ["icons@1"]}, "the name of a method")):
        with pytest.raises(ValueError, match=message):
            bootstrap_rel_differences(data, random_methods=RANDOMS, resamples=5, pooled=bad)
