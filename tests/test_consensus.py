"""Known answers for thresholds, votes, aggregations and the deterministic selection."""

import hashlib
import math

import numpy as np
import pytest

from icons_dagster.core.selection.analysis import top_fraction_mask
from icons_dagster.core.selection.consensus import (
    Selection,
    aggregate,
    group_quotas,
    id_hash,
    percentile_ranks,
    select,
    subset_size,
    vote_thresholds,
    votes,
)

# --- the 10 x 3 worked example -------------------------------------------------------
# Each sample's ascending position (0 = lowest, 9 = highest) in columns A, B, C:
#
#   id  A  B  C   |  every column is a permutation of 0..9
#   s0  9  9  3
#   s1  8  5  9
#   s2  4  8  8
#   s3  7  7  7
#   s4  6  6  6
#   s5  5  4  5
#   s6  3  3  4
#   s7  2  2  2
#   s8  1  1  1
#   s9  0  0  0
#
# Values: A = 0.1*pos - 0.2, B = 0.05*pos + 0.01, C = 0.3 - 0.07*(9 - pos), written
# out as literals below.
POS = np.array(
    [[9, 9, 3], [8, 5, 9], [4, 8, 8], [7, 7, 7], [6, 6, 6],
     [5, 4, 5], [3, 3, 4], [2, 2, 2], [1, 1, 1], [0, 0, 0]]
)
A = {0: -0.2, 1: -0.1, 2: 0.0, 3: 0.1, 4: 0.2, 5: 0.3, 6: 0.4, 7: 0.5, 8: 0.6, 9: 0.7}
B = {0: 0.01, 1: 0.06, 2: 0.11, 3: 0.16, 4: 0.21, 5: 0.26, 6: 0.31, 7: 0.36, 8: 0.41, 9: 0.46}
C = {0: -0.33, 1: -0.26, 2: -0.19, 3: -0.12, 4: -0.05, 5: 0.02, 6: 0.09, 7: 0.16, 8: 0.23, 9: 0.3}
SCORES = np.array([[A[a], B[b], C[c]] for a, b, c in POS])
IDS = [f"s{i}" for i in range(10)]


def test_worked_example_thresholds_votes_and_selection():
    # p = 0.2, N = 10 -> m = 2; tau_k = 2nd largest = the value at position 8.
    tau = vote_thresholds(SCORES, 0.2)
    np.testing.assert_array_equal(tau, [0.6, 0.41, 0.23])

    # Votes: position >= 8. A: s0 (9), s1 (8). B: s0 (9), s2 (8). C: s1 (9), s2 (8).
    v = votes(SCORES, tau)
    expected = np.zeros((10, 3), dtype=bool)
    expected[0] = [True, True, False]
    expected[1] = [True, False, True]
    expected[2] = [False, True, True]
    np.testing.assert_array_equal(v, expected)

    # Vote sums: s0 = s1 = s2 = 2, all others 0 -> a 3-way tie for 2 places.
    agg = aggregate(SCORES, "vote", p=0.2)
    np.testing.assert_array_equal(agg, [2, 2, 2, 0, 0, 0, 0, 0, 0, 0])

    # Tie-break by mean percentile rank = (sum of positions) / (3 * 9):
    #   s1: (8 + 5 + 9)/27 = 22/27  > s0: (9 + 9 + 3)/27 = 21/27 > s2: (4 + 8 + 8)/27 = 20/27
    # so s1 and s0 are selected, s2 is left out although it has 2 votes.
    # Zero-vote rows follow by mean rank: s3 21, s4 18, s5 14, s6 10, s7 6, s8 3, s9 0.
    sel = select(IDS, SCORES, 0.2)
    assert isinstance(sel, Selection)
    assert [IDS[i] for i in sel.order] == ["s1", "s0", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9"]
    assert [IDS[i] for i in np.flatnonzero(sel.selected)] == ["s0", "s1"]
    np.testing.assert_array_equal(sel.rank, [2, 1, 3, 4, 5, 6, 7, 8, 9, 10])
    assert sel.n_selected == 2
    assert sel.cutoff_score == 2.0
    assert sel.n_tied_at_cutoff == 3
    assert sel.n_decided_by_tiebreak == 2
    # percentile ranks are the positions / 9 (all values distinct)
    np.testing.assert_allclose(percentile_ranks(SCORES), POS / 9.0)


def test_tie_resolved_by_id_hash():
    # ids a, b, c, d; p = 0.5 -> m = 2.
    #   col0 = [3, 2, 2, 1] -> tau0 = 2 (2nd largest): a, b, c vote
    #   col1 = [3, 1, 1, 2] -> tau1 = 2:                a, d vote
    # Vote sums a=2, b=c=d=1: a is in, one place left among b, c, d.
    # Percentile ranks (N-1 = 3, ties averaged):
    #   col0: a 1, b = c = (1+2)/2/3 = 1/2, d 0;  col1: a 1, b = c = (0+1)/2/3 = 1/6, d 2/3
    #   mean: b = c = (1/2 + 1/6)/2 = 1/3, d = (0 + 2/3)/2 = 1/3 -> still tied.
    # sha256 prefixes: b 3e23e8160039594a, c 2e7d2c03a9507ae2, d 18ac3e7343f01689
    # -> ascending: d < c < b, so d takes the last place.
    ids = ["a", "b", "c", "d"]
    scores = np.array([[3.0, 3.0], [2.0, 1.0], [2.0, 1.0], [1.0, 2.0]])
    pref = {i: hashlib.sha256(i.encode()).hexdigest()[:16] for i in ids}
    assert pref["d"] < pref["c"] < pref["b"]
    np.testing.assert_array_equal(
        id_hash(ids), [int(pref[i], 16) for i in ids]
    )
    sel = select(ids, scores, 0.5)
    assert [ids[i] for i in sel.order] == ["a", "d", "c", "b"]
    np.testing.assert_array_equal(sel.selected, [True, False, False, True])
    assert sel.cutoff_score == 1.0
    assert sel.n_tied_at_cutoff == 3
    assert sel.n_decided_by_tiebreak == 1
    # the result does not depend on where the rows sit
    perm = [3, 1, 0, 2]
    sel2 = select([ids[i] for i in perm], scores[perm], 0.5)
    assert [ids[perm[i]] for i in sel2.order] == ["a", "d", "c", "b"]


def test_no_tiebreak_when_cut_falls_between_levels():
    scores = np.array([[3.0], [2.0], [1.0], [0.0]])
    sel = select(["w", "x", "y", "z"], scores, 0.5, method="mean")
    assert sel.cutoff_score == 2.0
    assert sel.n_tied_at_cutoff == 1
    assert sel.n_decided_by_tiebreak == 0


@pytest.mark.parametrize(
    "n,p,m",
    [
        (10, 0.25, 2),
        (3, 1, 3),
        (3, 1.0, 3),
        (7, 0.3, 2),
        (30, 0.1, 3),  # 0.1*30 in binary floating point is 3.0000000000000004
        (10, 0.7, 7),  # 0.7 as a double is 0.6999999999999999556: exact binary would give 6
        (665000, 0.2, 133000),
        (5, 0.2, 1),
        (3, 1 / 3, 1),  # 0.3333333333333333 * 3 = 0.9999999999999999 without the 1e-9 slack
        (9, 2 / 3, 6),
    ],
)
def test_subset_size(n, p, m):
    assert subset_size(n, p) == m


@pytest.mark.parametrize("n,p", [(10, 0.0), (10, 1.5), (10, -0.2), (4, 0.2), (0, 0.5), (10, math.nan)])
def test_subset_size_rejects(n, p):
    with pytest.raises(ValueError):
        subset_size(n, p)


def test_table6_aggregations_by_hand():
    # rows: [1, 4], [2, 2], [3, 3]
    s = np.array([[1.0, 4.0], [2.0, 2.0], [3.0, 3.0]])
    np.testing.assert_allclose(aggregate(s, "mean"), [2.5, 2.0, 3.0])
    np.testing.assert_allclose(aggregate(s, "max"), [4.0, 2.0, 3.0])
    # ranks col0 [0, 0.5, 1], col1 [1, 0, 0.5] -> means [0.5, 0.25, 0.75]
    np.testing.assert_allclose(aggregate(s, "rank"), [0.5, 0.25, 0.75])
    # col0: mu 2, population sd sqrt(2/3) -> z = [-r, 0, r] with r = sqrt(3/2)
    # col1: mu 3, sd sqrt(2/3)            -> z = [r, -r, 0]
    r = math.sqrt(1.5)
    np.testing.assert_allclose(aggregate(s, "norm"), [0.0, -r / 2, r / 2], atol=1e-12)
    # p = 1/3 -> m = 1: tau = [3, 4]; votes row0 [F, T], row1 [F, F], row2 [T, F]
    np.testing.assert_array_equal(aggregate(s, "vote", p=1 / 3), [1.0, 0.0, 1.0])
    # weights [2, 1]: row0 = 1, row1 = 0, row2 = 2
    np.testing.assert_array_equal(aggregate(s, "vote", p=1 / 3, weights=[2.0, 1.0]), [1.0, 0.0, 2.0])
    # weighted vote: each vote counts the influence that cast it: row0 4, row1 0, row2 3
    np.testing.assert_array_equal(aggregate(s, "wvote", p=1 / 3), [4.0, 0.0, 3.0])


def test_weights_change_selection():
    s = np.array([[1.0, 4.0], [2.0, 2.0], [3.0, 3.0]])
    ids = ["r0", "r1", "r2"]
    # unweighted: r0 and r2 both have 1 vote; mean rank r2 0.75 > r0 0.5 -> r2 first
    assert select(ids, s, 1 / 3).selected.tolist() == [False, False, True]
    # weights [1, 3]: r0 = 3 > r2 = 1 -> r0
    assert select(ids, s, 1 / 3, weights=[1.0, 3.0]).selected.tolist() == [True, False, False]
    with pytest.raises(ValueError):
        aggregate(s, "vote", p=1 / 3, weights=[1.0])
    with pytest.raises(ValueError):
        aggregate(s, "vote", p=1 / 3, weights=[1.0, -1.0])
    with pytest.raises(ValueError):
        aggregate(s, "mean", weights=[1.0, 1.0])


def test_norm_zero_std_column_contributes_zero():
    s = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    r = math.sqrt(1.5)
    np.testing.assert_allclose(aggregate(s, "norm"), [-r / 2, 0.0, r / 2], atol=1e-12)


def test_percentile_ranks_ties_and_single_row():
    col = np.array([[5.0], [1.0], [5.0], [3.0]])
    # sorted 1, 3, 5, 5: the two 5s share (2 + 3)/2 / 3 = 5/6
    np.testing.assert_allclose(percentile_ranks(col)[:, 0], [5 / 6, 0.0, 5 / 6, 1 / 3])
    np.testing.assert_array_equal(percentile_ranks(np.array([[0.3, -1.0]])), [[1.0, 1.0]])
    const = percentile_ranks(np.zeros((4, 1)))
    np.testing.assert_allclose(const, 0.5)


def test_vote_thresholds_order_statistic_matches_numpy_quantile():
    rng = np.random.default_rng(3)
    for n in (10, 11, 97, 1000):
        s = rng.integers(0, 15, size=(n, 4)).astype(np.float32)
        m = subset_size(n, 0.2)
        tau = vote_thresholds(s, 0.2)
        np.testing.assert_array_equal(tau, -np.sort(-s, axis=0)[m - 1])
        q = np.quantile(s, (n - m + 0.5) / n, method="inverted_cdf", axis=0)
        np.testing.assert_array_equal(tau, q)


@pytest.mark.parametrize("method", ["vote", "mean", "max", "rank", "norm", "filter"])
def test_permutation_invariance(method):
    rng = np.random.default_rng(7)
    n, k = 500, 4
    # coarse values so that there are many exact ties at every level
    s = rng.integers(0, 6, size=(n, k)).astype(np.float32) / 7
    s[100:110] = s[5]  # identical rows: only the id hash can order them
    ids = [f"id-{i:04d}" for i in range(n)]
    base = select(ids, s, 0.2, method=method)
    assert base.selected.sum() == base.n_selected == subset_size(n, 0.2)
    base_order = [ids[i] for i in base.order]
    for trial in range(5):
        perm = rng.permutation(n)
        if trial == 0:
            s_p = np.asfortranarray(s[perm])  # memory layout must not matter either
        else:
            s_p = s[perm]
        sel = select([ids[i] for i in perm], s_p, 0.2, method=method)
        assert [ids[perm[i]] for i in sel.order] == base_order
        assert {ids[perm[i]] for i in np.flatnonzero(sel.selected)} == {
            ids[i] for i in np.flatnonzero(base.selected)
        }
        assert sel.n_decided_by_tiebreak == base.n_decided_by_tiebreak


def test_exactly_m_selected_and_rank_consistent():
    rng = np.random.default_rng(11)
    for n, p in [(1, 1.0), (13, 0.3), (200, 0.05), (1000, 0.2)]:
        s = rng.integers(0, 3, size=(n, 3)).astype(float)
        ids = [str(i) for i in range(n)]
        sel = select(ids, s, p)
        m = subset_size(n, p)
        assert sel.selected.sum() == m == sel.n_selected
        np.testing.assert_array_equal(sel.rank[sel.order], np.arange(1, n + 1))
        assert set(np.flatnonzero(sel.selected)) == set(sel.order[:m])
        agg = aggregate(s, "vote", p=p)
        # the aggregate never increases along the order
        assert np.all(np.diff(agg[sel.order]) <= 0)


def test_select_rejects_bad_input():
    s = np.zeros((3, 2))
    with pytest.raises(ValueError):
        select(["a", "a", "b"], s, 0.5)
    with pytest.raises(ValueError):
        select(["a", "b"], s, 0.5)
    with pytest.raises(ValueError):
        select(["a", "b", "c"], np.array([[np.nan, 0], [0, 0], [0, 0]]), 0.5)
    with pytest.raises(ValueError):
        select(["a", "b", "c"], s, 0.5, method="median")


# --- the fast paths give the reference results --------------------------------------------

from icons_dagster.core.selection import consensus as _consensus  # noqa: E402


def _reference_order(ids, s, p, method, hash_fn):
    """The documented order spelled out: lexsort over (id, hash of every id, -rank sum, -agg)."""
    n = s.shape[0]
    r2sum = _consensus._rank_sums2(s).sum(axis=1)
    agg = aggregate(s, method, p=p if method == "vote" else None)
    h = hash_fn(ids)
    keys = [h, -r2sum, -agg]
    if np.unique(h).size != n:
        _, str_rank = np.unique(np.asarray(ids, dtype=str), return_inverse=True)
        keys.insert(0, str_rank.reshape(-1))
    return np.lexsort(keys)


@pytest.mark.parametrize("method", ["vote", "mean", "rank", "norm"])
def test_selection_hashes_only_tied_rows_and_matches_reference(monkeypatch, method):
    rng = np.random.default_rng(21)
    hashed = []

    def counting_hash(ids):
        hashed.append(len(ids))
        return id_hash(ids)

    monkeypatch.setattr(_consensus, "id_hash", counting_hash)
    for n in (2, 3, 37, 400):
        s = rng.integers(0, 4, size=(n, 3)).astype(np.float64) / 3
        if n > 10:
            s[: n // 4] = s[0]  # a block of identical rows: only the hash orders them
            s[n // 2 :, 0] = -0.0 if n % 2 else 0.0
        ids = [f"r{i}" for i in rng.permutation(n)]
        hashed.clear()
        sel = select(ids, s, 0.5, method=method)
        np.testing.assert_array_equal(sel.order, _reference_order(ids, s, 0.5, method, id_hash))
        r2sum = _consensus._rank_sums2(s).sum(axis=1)
        agg = aggregate(s, method, p=0.5 if method == "vote" else None)
        pairs = list(zip(agg.tolist(), r2sum.tolist()))
        n_shared = sum(pairs.count(pair) > 1 for pair in pairs)
        assert sum(hashed) == n_shared  # unique (agg, rank-sum) rows are never hashed


def test_selection_hash_collision_falls_back_to_id_string(monkeypatch):
    def colliding_hash(ids):  # every id collides with every other
        return np.zeros(len(ids), dtype=np.uint64)

    monkeypatch.setattr(_consensus, "id_hash", colliding_hash)
    s = np.array([[1.0], [1.0], [2.0], [1.0]])
    ids = ["b", "c", "z", "a"]
    sel = select(ids, s, 0.5, method="mean")
    assert [ids[i] for i in sel.order] == ["z", "a", "b", "c"]
    np.testing.assert_array_equal(sel.order, _reference_order(ids, s, 0.5, "mean", colliding_hash))


def test_norm_matches_two_full_sorts():
    rng = np.random.default_rng(22)
    for trial in range(50):
        n, k = int(rng.integers(1, 60)), int(rng.integers(1, 4))
        s = rng.standard_normal((n, k)) if trial % 2 else rng.integers(-2, 3, size=(n, k)).astype(np.float32)
        x = s.astype(np.float64)
        mu = np.sort(x, axis=0).sum(axis=0) / n
        dev = x - mu[None, :]
        sd = np.sqrt(np.sort(dev * dev, axis=0).sum(axis=0) / n)
        z = np.zeros_like(x)
        ok = sd > 0
        z[:, ok] = dev[:, ok] / sd[ok][None, :]
        want = np.zeros(n)
        for c in range(k):
            want += z[:, c]
        np.testing.assert_array_equal(aggregate(s, "norm"), want / k)


# --- tie-break rule and coverage reserve ----------------------------------------------


def test_max_rank_tiebreak_prefers_a_specialists_favourite():
    # method mean, N = 4, p = 0.5 -> m = 2. Means: a 5/3, c 0.5, d 0.5, e 0.0667.
    # a is in; c and d tie at 0.5. Ascending positions per column:
    #   col0: e0 c1 a2 d3   col1: d0 e1 c2 a3   col2: d0 e1 c2 a3
    # rank sums: c 1+2+2 = 5 > d 3+0+0 = 3 -> mean-rank keeps c;
    # max ranks: c 2 < d 3 -> max-rank keeps d (benchmark 0's favourite).
    ids = ["a", "c", "d", "e"]
    s = np.array([[1.0, 2.0, 2.0], [0.5, 0.5, 0.5], [1.5, 0.0, 0.0], [0.0, 0.1, 0.1]])
    mean_rank = select(ids, s, 0.5, method="mean")
    max_rank = select(ids, s, 0.5, method="mean", tiebreak="max-rank")
    assert [ids[i] for i in np.flatnonzero(mean_rank.selected)] == ["a", "c"]
    assert [ids[i] for i in np.flatnonzero(max_rank.selected)] == ["a", "d"]
    assert mean_rank.n_decided_by_tiebreak == max_rank.n_decided_by_tiebreak == 1
    with pytest.raises(ValueError, match="tiebreak"):
        select(ids, s, 0.5, tiebreak="min-rank")


# N = 6, K = 2, p = 0.5 -> m = 3. Benchmark 1's favourite d is the worst on benchmark 0.
COVER_IDS = ["a", "b", "c", "d", "e", "f"]
COVER_SCORES = np.array([[9.0, 7.0], [8.0, 8.0], [10.0, 6.0], [0.0, 9.0], [1.0, 5.0], [2.0, 1.0]])


def test_coverage_reserves_each_benchmarks_top_records():
    # Plain vote: col0 top 3 = c, a, b; col1 top 3 = d, b, a -> votes a 2, b 2, c 1, d 1.
    # Rank sums: a 4+3 = 7, b 3+4 = 7, c 5+2 = 7, d 0+5 = 5 -> {a, b, c}.
    plain = select(COVER_IDS, COVER_SCORES, 0.5)
    assert {COVER_IDS[i] for i in np.flatnonzero(plain.selected)} == {"a", "b", "c"}
    assert plain.n_reserved == plain.n_by_coverage == 0
    # coverage 2/3: q = floor(2/3 * 3 / 2) = 1 place per benchmark: c (col0) and d (col1).
    # The one place left goes to the plain order's first: a or b (equal votes and rank
    # sums), decided by the sha256 prefix: b 3e23e8160039594a < a ca978112ca1bbdca -> b.
    covered = select(COVER_IDS, COVER_SCORES, 0.5, coverage=2 / 3)
    assert {COVER_IDS[i] for i in np.flatnonzero(covered.selected)} == {"b", "c", "d"}
    assert [COVER_IDS[i] for i in covered.order[:2]] == ["c", "d"]  # reserved, in plain order
    assert covered.n_reserved == 2 and covered.n_by_coverage == 1  # d was out before
    assert covered.cutoff_score == 2.0 and covered.n_tied_at_cutoff == 2 and covered.n_decided_by_tiebreak == 1
    # coverage 1 reserves floor(1.5) = 1 as well; coverage 0 is the plain selection
    np.testing.assert_array_equal(select(COVER_IDS, COVER_SCORES, 0.5, coverage=1).selected, covered.selected)
    np.testing.assert_array_equal(select(COVER_IDS, COVER_SCORES, 0.5, coverage=0).order, plain.order)
    with pytest.raises(ValueError, match="coverage"):
        select(COVER_IDS, COVER_SCORES, 0.5, coverage=1.5)


def test_each_rows_reason_says_why_it_is_in_or_out():
    """The worked case above: votes a 2, b 2, c 1, d 1, e 0, f 0."""
    from icons_dagster.core.selection.consensus import selection_reasons

    # Plain: a and b above the cutoff (1 vote); c and d tie at it, c kept by its rank sum 7 > 5.
    plain = dict(zip(COVER_IDS, selection_reasons(select(COVER_IDS, COVER_SCORES, 0.5), ["gqa", "pope"]), strict=True))
    assert plain == {
        "a": "vote: above the cutoff", "b": "vote: above the cutoff", "c": "vote: at the cutoff, kept by the tie-break",
        "d": "out: at the cutoff, left out by the tie-break", "e": "out: below the cutoff", "f": "out: below the cutoff",
    }  # fmt: skip
    # Coverage 2/3: c and d reserved as their benchmark's top 1; a and b tie at 2 for the last place.
    covered = dict(zip(COVER_IDS, selection_reasons(select(COVER_IDS, COVER_SCORES, 0.5, coverage=2 / 3), ["gqa", "pope"]), strict=True))
    assert covered == {
        "a": "out: at the cutoff, left out by the tie-break", "b": "vote: at the cutoff, kept by the tie-break",
        "c": "coverage: among the top 1 of gqa", "d": "coverage: among the top 1 of pope",
        "e": "out: below the cutoff", "f": "out: below the cutoff",
    }  # fmt: skip


@pytest.mark.parametrize("tiebreak", ["mean-rank", "max-rank", "id-hash"])
@pytest.mark.parametrize("coverage", [0.0, 0.3, 1.0])
def test_coverage_properties_and_permutation_invariance(tiebreak, coverage):
    rng = np.random.default_rng(5)
    n, k, p = 400, 4, 0.2
    s = rng.integers(0, 9, size=(n, k)).astype(np.float64) / 9  # many ties
    ids = [f"id-{i:04d}" for i in range(n)]
    base = select(ids, s, p, tiebreak=tiebreak, coverage=coverage)
    m = subset_size(n, p)
    q = int(coverage * m / k)
    assert base.selected.sum() == m
    for c in range(k):
        # every benchmark's own top q is in the subset (the same hash tie-break as analysis)
        top = top_fraction_mask(s[:, c], q / n, ids) if q else np.zeros(n, dtype=bool)
        assert np.all(base.selected[top])
    assert base.n_reserved <= k * q
    for _ in range(3):
        perm = rng.permutation(n)
        sel = select([ids[i] for i in perm], s[perm], p, tiebreak=tiebreak, coverage=coverage)
        assert [ids[perm[i]] for i in sel.order] == [ids[i] for i in base.order]


def test_group_quotas_by_largest_remainder():
    # shares 3/5, 1/5, 1/5 of m = 3: exact 1.8, 0.6, 0.6 -> floors 1, 0, 0; two places left by
    # remainder: x (0.8), then y before z (equal 0.6, by label)
    everyone = np.ones(5, dtype=bool)
    assert group_quotas(["x", "x", "x", "y", "z"], everyone, 3) == {"x": 2, "y": 1, "z": 0}
    # only the reference rows count: x's two non-reference rows make it 1/3 of three
    assert group_quotas(["x", "x", "x", "y", "z"], np.array([True, False, False, True, True]), 3) == {"x": 1, "y": 1, "z": 1}
    with pytest.raises(ValueError, match="no row"):
        group_quotas(["x"], np.zeros(1, dtype=bool), 1)


def test_quota_fill_on_the_worked_example():
    # p = 0.2: m = 2, plain order s1, s0, s2, s3, ..., s9 and voters s0, s1, s2 (first test).
    groups = ["x", "x"] + ["y"] * 8
    # pool shares 2/10 and 8/10: exact 0.4 and 1.6 -> y gets both places: its first two rows
    pool = select(IDS, SCORES, 0.2, groups=groups)
    assert pool.group_quotas == {"x": 0, "y": 2}
    assert [IDS[i] for i in pool.order[:4]] == ["s2", "s3", "s1", "s0"]
    assert [IDS[i] for i in np.flatnonzero(pool.selected)] == ["s2", "s3"]
    # the voters' shares 2/3 and 1/3: exact 4/3 and 2/3 -> one place each: s1 (x) and s2 (y)
    voters = select(IDS, SCORES, 0.2, groups=groups, group_shares="voters")
    assert voters.group_quotas == {"x": 1, "y": 1}
    assert [IDS[i] for i in np.flatnonzero(voters.selected)] == ["s1", "s2"]
    # one group: the plain selection
    np.testing.assert_array_equal(select(IDS, SCORES, 0.2, groups=["g"] * 10).order, select(IDS, SCORES, 0.2).order)
    with pytest.raises(ValueError, match="coverage"):
        select(IDS, SCORES, 0.2, groups=groups, coverage=1)
    with pytest.raises(ValueError, match="group labels"):
        select(IDS, SCORES, 0.2, groups=groups[:3])
    with pytest.raises(ValueError, match="group_shares"):
        select(IDS, SCORES, 0.2, groups=groups, group_shares="benchmarks")


def test_quota_fill_properties_and_permutation_invariance():
    rng = np.random.default_rng(7)
    n, k, p = 300, 4, 0.2
    s = rng.integers(0, 9, size=(n, k)).astype(np.float64) / 9
    ids = [f"id-{i:04d}" for i in range(n)]
    groups = [("a", "b", "c")[i % 3] if i < 240 else "d" for i in range(n)]
    base = select(ids, s, p, groups=groups, group_shares="voters")
    m = subset_size(n, p)
    assert base.selected.sum() == m and sum(base.group_quotas.values()) == m
    plain_rank = {i: r for r, i in enumerate(select(ids, s, p).order.tolist())}
    for g, q in base.group_quotas.items():
        members = [i for i in range(n) if groups[i] == g]
        chosen = sorted((i for i in members if base.selected[i]), key=plain_rank.get)
        assert len(chosen) == q
        # each group's places go to its best rows in the plain order
        assert chosen == sorted(members, key=plain_rank.get)[:q]
    for _ in range(2):
        perm = rng.permutation(n)
        again = select([ids[i] for i in perm], s[perm], p, groups=[groups[i] for i in perm], group_shares="voters")
        assert [ids[perm[i]] for i in again.order] == [ids[i] for i in base.order]


def test_filter_keeps_each_benchmarks_top_half_and_fills_in_id_hash_order():
    """Rule 2 as a filter on the worked example: the top half of a column is its 5 highest
    positions (5..9), so s0-s5 are kept (s5 by A alone) and s6-s9, below every median, are not."""
    kept = aggregate(SCORES, "filter")
    np.testing.assert_array_equal(kept, [1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    by_hash = sorted(IDS, key=lambda i: hashlib.sha256(i.encode()).digest()[:8])
    kept_by_hash = [i for i in by_hash if int(i[1:]) <= 5]
    for p, m in ((0.2, 2), (0.5, 5), (0.6, 6)):
        chosen = select(IDS, SCORES, p, method="filter", tiebreak="id-hash")
        assert {IDS[i] for i in np.flatnonzero(chosen.selected)} == set(kept_by_hash[:m]), p
    # past the kept records, the dropped ones fill in the same hash order
    chosen = select(IDS, SCORES, 0.8, method="filter", tiebreak="id-hash")
    dropped_by_hash = [i for i in by_hash if int(i[1:]) > 5]
    assert {IDS[i] for i in np.flatnonzero(chosen.selected)} == set(kept_by_hash) | set(dropped_by_hash[:2])
    # the fill ignores influence: any scores that keep the same records select the same ids
    reshaped = SCORES.copy()
    reshaped[:6] = SCORES[:6][::-1]  # s0-s5 swap values among themselves: all still in some top half
    again = select(IDS, reshaped, 0.2, method="filter", tiebreak="id-hash")
    np.testing.assert_array_equal(again.selected, select(IDS, SCORES, 0.2, method="filter", tiebreak="id-hash").selected)
    # a pool of one record keeps it
    np.testing.assert_array_equal(aggregate(SCORES[:1], "filter"), [1.0])


def test_filter_ties_at_the_median_count_as_kept():
    """Eq. 4's ">=": a record equal to the top-half threshold of a benchmark is kept."""
    s = np.array([[3.0], [2.0], [2.0], [1.0]])  # m = 2: threshold 2, so three rows reach it
    np.testing.assert_array_equal(aggregate(s, "filter"), [1, 1, 1, 0])
