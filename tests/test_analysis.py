"""Known-answer tests for selection analysis numbers and the metadata PNG charts."""

from __future__ import annotations

import base64
import hashlib
import math

import numpy as np
import pytest

from icons_dagster.core.selection.analysis import (
    benchmark_coverage,
    family_enrichment,
    family_shares,
    overlap_matrix,
    top_fraction_mask,
)
from icons_dagster.core.plots import heatmap_png, histogram_png, markdown_image, votes_histogram_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ---------------------------------------------------------------- top_fraction_mask

IDS = [f"r{i}" for i in range(10)]
# r1 is the unique max; r0, r2, r3, r5, r7, r9 tie at 0.5.
SCORES = np.array([0.5, 0.9, 0.5, 0.5, 0.1, 0.5, 0.2, 0.5, 0.3, 0.5])


def _hash8(record_id: str) -> int:
    return int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big")


def test_hash_order_of_tied_ids_is_as_stated():
    # sha256 first 8 bytes (hex): r5 5eb242ae..., r9 794d9d1a..., r2 db77fd01...,
    # r7 dbb7b294..., r0 dd191696..., r3 e49d63b2...  -> ascending: r5, r9, r2, r7, r0, r3
    tied = ["r0", "r2", "r3", "r5", "r7", "r9"]
    assert sorted(tied, key=_hash8) == ["r5", "r9", "r2", "r7", "r0", "r3"]


def test_top_fraction_mask_breaks_ties_by_id_hash():
    # floor(0.3 * 10) = 3: r1 (0.9), then the two lowest-hash ties r5, r9.
    mask = top_fraction_mask(SCORES, 0.3, IDS)
    assert mask.dtype == bool
    assert [IDS[i] for i in np.flatnonzero(mask)] == ["r1", "r5", "r9"]
    # floor(0.5 * 10) = 5: add r2, r7.
    mask5 = top_fraction_mask(SCORES, 0.5, IDS)
    assert sorted(IDS[i] for i in np.flatnonzero(mask5)) == ["r1", "r2", "r5", "r7", "r9"]


def test_top_fraction_mask_at_least_one_and_full():
    assert [IDS[i] for i in np.flatnonzero(top_fraction_mask(SCORES, 0.01, IDS))] == ["r1"]
    assert top_fraction_mask(SCORES, 1.0, IDS).all()
    assert top_fraction_mask(np.array([]), 0.5, []).shape == (0,)


def test_top_fraction_mask_independent_of_input_order():
    perm = np.array([7, 3, 9, 0, 5, 1, 8, 2, 6, 4])
    mask = top_fraction_mask(SCORES[perm], 0.3, [IDS[i] for i in perm])
    assert sorted(IDS[i] for i in perm[mask]) == ["r1", "r5", "r9"]


def test_top_fraction_mask_rejects_mismatched_ids():
    with pytest.raises(ValueError):
        top_fraction_mask(SCORES, 0.3, IDS[:5])


# ---------------------------------------------------------------- overlap_matrix


def _mask(n: int, idx: list[int]) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[idx] = True
    return m


def test_overlap_matrix_hand_example():
    # A={0,1,2,3}, B={2,3,4,5}: |A∩B|/|A| = 2/4 = 0.5 (both ways).
    # C={0,1} (size 2): |A∩C|/|A| = 2/4 = 0.5, |C∩A|/|C| = 2/2 = 1, B∩C empty.
    names, mat = overlap_matrix({"B": _mask(8, [2, 3, 4, 5]), "A": _mask(8, [0, 1, 2, 3]), "C": _mask(8, [0, 1])})
    assert names == ["A", "B", "C"]
    expected = np.array([[1.0, 0.5, 0.5], [0.5, 1.0, 0.0], [1.0, 0.0, 1.0]])
    np.testing.assert_allclose(mat, expected)


def test_overlap_matrix_empty_selection_and_no_masks():
    names, mat = overlap_matrix({"a": _mask(4, []), "b": _mask(4, [1])})
    assert names == ["a", "b"]
    np.testing.assert_allclose(mat, [[1.0, 0.0], [0.0, 1.0]])
    names, mat = overlap_matrix({})
    assert names == [] and mat.shape == (0, 0)


# ---------------------------------------------------------------- family stats

FAMILIES = ["x", "y", "x", "z", "y", "x", "y", "x", "z", "y"]  # 4 x, 4 y, 2 z


def test_family_enrichment_hand_example():
    # Selection {0, 2, 5, 1}: 3 "x" of 4 -> (3/4) / (4/10) = 1.875.
    selected = _mask(10, [0, 1, 2, 5])
    assert family_enrichment(selected, FAMILIES, "x") == pytest.approx(1.875)
    # "y": (1/4) / (4/10) = 0.625; "z": 0 / (2/10) = 0.
    assert family_enrichment(selected, FAMILIES, "y") == pytest.approx(0.625)
    assert family_enrichment(selected, FAMILIES, "z") == 0.0


def test_family_enrichment_undefined_is_nan():
    selected = _mask(10, [0, 1])
    assert math.isnan(family_enrichment(selected, FAMILIES, "absent"))
    assert math.isnan(family_enrichment(_mask(10, []), FAMILIES, "x"))


def test_family_shares_sum_to_one():
    shares = family_shares(_mask(10, [0, 1, 2, 5]), FAMILIES)
    assert list(shares) == ["x", "y", "z"]
    assert shares == pytest.approx({"x": 0.75, "y": 0.25, "z": 0.0})
    assert sum(shares.values()) == pytest.approx(1.0)
    assert sum(family_shares(np.ones(10, dtype=bool), FAMILIES).values()) == pytest.approx(1.0)
    assert set(family_shares(_mask(10, []), FAMILIES).values()) == {0.0}


# ---------------------------------------------------------------- benchmark_coverage


def test_benchmark_coverage_hand_example():
    # 6 samples, 3 benchmarks. Selected = {0, 1, 4}.
    # b1 voters {0,1,2,3} -> 2/4 = 0.5; b2 voters {1,4} -> 2/2 = 1; b3 voters {5} -> 0/1 = 0.
    votes = np.zeros((6, 3), dtype=bool)
    votes[[0, 1, 2, 3], 0] = True
    votes[[1, 4], 1] = True
    votes[[5], 2] = True
    cov = benchmark_coverage(_mask(6, [0, 1, 4]), votes, ["b1", "b2", "b3"])
    assert cov == pytest.approx({"b1": 0.5, "b2": 1.0, "b3": 0.0})


def test_benchmark_coverage_no_voters_is_nan():
    cov = benchmark_coverage(_mask(3, [0]), np.zeros((3, 1), dtype=bool), ["b"])
    assert math.isnan(cov["b"])


# ---------------------------------------------------------------- plots


def test_histogram_png_valid_and_deterministic():
    rng = np.random.default_rng(0)
    values = rng.normal(size=500)
    a = histogram_png(values, "influence", "score", threshold=0.5)
    b = histogram_png(values.copy(), "influence", "score", threshold=0.5)
    assert a.startswith(PNG_MAGIC)
    assert a == b
    assert len(a) < 200_000
    width, height = int.from_bytes(a[16:20], "big"), int.from_bytes(a[20:24], "big")  # the IHDR chunk
    assert (width, height) == (800, 560)  # the size the UI's dialog shows it at: readable axes


def test_histogram_png_constant_and_empty_input():
    assert histogram_png(np.full(20, 3.0), "const", "x", threshold=3.0).startswith(PNG_MAGIC)
    assert histogram_png(np.array([]), "empty", "x").startswith(PNG_MAGIC)
    assert histogram_png(np.array([np.nan, np.inf]), "nonfinite", "x").startswith(PNG_MAGIC)


def test_votes_histogram_png():
    vote_sums = np.array([0, 1, 1, 2, 3, 3, 3, 0])
    selected = vote_sums >= 3
    a = votes_histogram_png(vote_sums, 3, selected)
    assert a.startswith(PNG_MAGIC)
    assert a == votes_histogram_png(vote_sums, 3, selected)
    assert votes_histogram_png(vote_sums, 3).startswith(PNG_MAGIC)
    # Empty selection and constant votes.
    assert votes_histogram_png(np.zeros(5, dtype=int), 2, np.zeros(5, dtype=bool)).startswith(PNG_MAGIC)
    assert votes_histogram_png(np.array([], dtype=int), 2, np.array([], dtype=bool)).startswith(PNG_MAGIC)


def test_heatmap_png():
    names, mat = overlap_matrix({"A": _mask(8, [0, 1, 2, 3]), "B": _mask(8, [2, 3, 4, 5])})
    a = heatmap_png(mat, names, "top-p overlap")
    assert a.startswith(PNG_MAGIC)
    assert a == heatmap_png(mat, names, "top-p overlap")
    assert heatmap_png(np.ones((3, 3)), ["a", "b", "c"], "const").startswith(PNG_MAGIC)
    assert heatmap_png(np.zeros((0, 0)), [], "empty").startswith(PNG_MAGIC)
    with pytest.raises(ValueError):
        heatmap_png(np.ones((2, 3)), ["a", "b"], "bad")


def test_markdown_image_roundtrip():
    png = histogram_png(np.arange(5.0), "t", "x")
    md = markdown_image(png, "alt text")
    prefix = "![alt text](data:image/png;base64,"
    assert md.startswith(prefix) and md.endswith(")")
    assert base64.b64decode(md[len(prefix) : -1]) == png
