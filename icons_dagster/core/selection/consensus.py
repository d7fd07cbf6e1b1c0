"""Influence consensus: thresholds, votes, aggregations and deterministic selection.

Paper eq. 4 / Algorithm 2: per benchmark k a threshold tau_k at the (1-p) percentile of
its influence scores, one vote per benchmark where I_k(z) >= tau_k, the top p fraction
by vote sum is the subset. Table 6 adds the alternative aggregations mean, max, rank
(mean percentile rank) and norm (mean z-score).

Definitions fixed here (the paper leaves them open):

* Subset size: m = floor(p * N + 1e-9), computed exactly with p read as the decimal
  the user wrote (0.7 is 7/10, not the double just below it), so 0.1 * 30 gives 3,
  0.7 * 10 gives 7 and (1/3) * 3 gives 1.
* Threshold: tau_k is the m-th largest score of column k (an order statistic, same m
  as the subset size). Without ties exactly m samples vote for each benchmark. It equals
  ``np.quantile(col, (N - m + 0.5) / N, method="inverted_cdf")`` (the 0.5 keeps the
  floating q away from the step). numpy's default (linear) ``np.percentile(col,
  100*(1-p))`` would instead give m or m+1 voters per benchmark, depending on N.
* Selection order, the only order ever used (never file order):
    1. aggregate value, descending;
    2. mean per-benchmark percentile rank, descending (computed from exact integer
       rank sums, so equal ranks compare equal);
    3. ``id_hash`` = first 8 bytes (big-endian) of sha256(id), ascending;
    4. the id string, ascending (code-point order; only on a hash collision).
  With K benchmarks the vote has only K+1 levels, so step 2 decides most of the cut:
  among samples with equal votes, those ranked higher on average across benchmarks
  win. Ids must be unique, which makes the order total and independent of row order.
  ``tiebreak="max-rank"`` uses the best single-benchmark percentile rank in step 2
  instead (a specialist's favourite beats an all-round middling record);
  ``tiebreak="id-hash"`` skips step 2, so equal aggregates fill in ``id_hash`` order: a
  fixed pseudo-random order that ignores influence (the ``filter`` rule's fill).

Coverage (our addition, paper Appendix D's risk): a consensus rewards records that
resemble several benchmarks, and a family of records that serves only one benchmark can
vanish. ``coverage = c`` reserves q = floor(c * m / K) places per benchmark: each
benchmark's own q highest-influence records (its specialist ranking, ties by
``id_hash``) are selected first, whatever their aggregate; the other places are filled in
the order above. c = 0 is the paper's consensus; c = 1 is a union of specialists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

import numpy as np

__all__ = [
    "AGGREGATIONS",
    "METHODS",
    "TIEBREAKS",
    "coverage_quota",
    "group_quotas",
    "top_k_mask",
    "subset_size",
    "vote_thresholds",
    "votes",
    "percentile_ranks",
    "aggregate",
    "id_hash",
    "Selection",
    "select",
]

TIEBREAKS = ("mean-rank", "max-rank", "id-hash")


def _as_fraction(p) -> Fraction:
    if isinstance(p, Fraction):
        return p
    if isinstance(p, (int, np.integer)) and not isinstance(p, bool):
        return Fraction(int(p))
    if isinstance(p, Decimal):
        return Fraction(p)
    pf = float(p)
    if not np.isfinite(pf):
        raise ValueError(f"p must be finite, got {p!r}")
    # repr gives the shortest decimal that round-trips: the number the user wrote.
    return Fraction(repr(pf))


# p*n within 1e-9 below an integer counts as that integer: a p the user wrote with
# <= 8 decimals is exact anyway, and this catches 1/3 -> 0.3333333333333333 (x3 gives
# 0.9999999999999999) for any n below ~1e7.
_SLACK = Fraction(1, 10**9)


def subset_size(n: int, p: float) -> int:
    """m = floor(p * n + 1e-9), p taken as its exact shortest decimal; p in (0, 1], m >= 1."""
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    fp = _as_fraction(p)
    if not 0 < fp <= 1:
        raise ValueError(f"p must be in (0, 1], got {p!r}")
    m = int(fp * n + _SLACK)  # floor (non-negative)
    if m == 0:
        raise ValueError(f"p={p!r} of n={n} selects nothing (floor(p*n) = 0)")
    return int(m)


def _check_scores(scores) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty [N, K] array, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise TypeError(f"scores must be real numbers, got {s.dtype}")
    if np.issubdtype(s.dtype, np.floating) and not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    return s


def vote_thresholds(scores, p) -> np.ndarray:
    """[K]: tau_k = the m-th largest value of column k, m = subset_size(N, p)."""
    s = _check_scores(scores)
    n = s.shape[0]
    m = subset_size(n, p)
    # ascending position n - m holds the m-th largest
    return np.partition(s, n - m, axis=0)[n - m].copy()


def votes(scores, thresholds) -> np.ndarray:
    """[N, K] bool: score >= tau_k (eq. 4 indicator)."""
    s = _check_scores(scores)
    t = np.asarray(thresholds)
    if t.shape != (s.shape[1],):
        raise ValueError(f"thresholds must have shape ({s.shape[1]},), got {t.shape}")
    return s >= t[None, :]


def _rank_sums2(s: np.ndarray) -> np.ndarray:
    """[N, K] int64: rank_min + rank_max (0-based) of each score within its column.

    Twice the average rank of a tie group, kept as an exact integer so that equal ranks
    stay equal after summing over benchmarks.
    """
    n, k = s.shape
    st = np.ascontiguousarray(s.T)  # one contiguous row per benchmark
    out = np.empty((k, n), dtype=np.int64)
    # order within a tie group is irrelevant (the group shares one value), so the
    # faster unstable sort is fine
    order = np.argsort(st, axis=1)
    for c in range(k):  # K is small; everything over N is vectorized
        o = order[c]
        v = st[c, o]
        new = np.empty(n, dtype=bool)
        new[0] = True
        np.not_equal(v[1:], v[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], n) - 1
        gid = np.cumsum(new) - 1
        out[c, o] = starts[gid] + ends[gid]
    return out.T


def percentile_ranks(scores) -> np.ndarray:
    """[N, K] float64 in [0, 1]: 0 = lowest in its column, 1 = highest.

    Ties share the average rank, (rank_min + rank_max) / 2 / (N - 1); N == 1 gives 1.0.
    """
    s = _check_scores(scores)
    n = s.shape[0]
    if n == 1:
        return np.ones(s.shape, dtype=np.float64)
    return _rank_sums2(s) / (2.0 * (n - 1))


def _mean_rank_from_sums(r2: np.ndarray, n: int) -> np.ndarray:
    k = r2.shape[1]
    if n == 1:
        return np.ones(r2.shape[0], dtype=np.float64)
    # one division of an exact integer: equal rank sums give equal floats
    return r2.sum(axis=1) / (2.0 * (n - 1) * k)


def _check_weights(weights, k: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k,):
        raise ValueError(f"weights must have shape ({k},), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    return w


def _row_sum(x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Sum over columns, added left to right elementwise.

    Fixed order whatever the memory layout or row position, so a row's aggregate has
    the same bits in any permutation of the pool (BLAS or pairwise reductions don't
    promise that, and a last-bit difference can flip an exact tie).
    """
    acc = np.zeros(x.shape[0], dtype=np.float64)
    for c in range(x.shape[1]):
        acc += x[:, c] if w is None else w[c] * x[:, c]
    return acc


def _vote(s: np.ndarray, p: float | None, weights) -> np.ndarray:
    """Number of benchmarks with score >= tau_k (eq. 4; needs p); with ``weights`` the weighted sum."""
    if p is None:
        raise ValueError("method='vote' needs p")
    v = votes(s, vote_thresholds(s, p))
    if weights is None:
        return v.sum(axis=1).astype(np.float64)
    return _row_sum(v.astype(np.float64), _check_weights(weights, s.shape[1]))


def _mean(s: np.ndarray, p: float | None, weights) -> np.ndarray:
    """Mean over benchmarks."""
    return _row_sum(s.astype(np.float64)) / s.shape[1]


def _max(s: np.ndarray, p: float | None, weights) -> np.ndarray:
    """Max over benchmarks."""
    return s.astype(np.float64).max(axis=1)


def _rank(s: np.ndarray, p: float | None, weights) -> np.ndarray:
    """Mean percentile rank (see ``percentile_ranks``)."""
    return _mean_rank_from_sums(_rank_sums2(s), s.shape[0])


def _norm(s: np.ndarray, p: float | None, weights) -> np.ndarray:
    """Mean z-score per column with population std; a zero-std column contributes 0.

    Column moments are summed over sorted values so they do not depend on row order (a
    permuted pool must give the identical selection)."""
    n, k = s.shape
    x = s.astype(np.float64)
    # column sums over sorted values: the same bits for any row order
    xs = np.sort(x, axis=0)
    mu = xs.sum(axis=0) / n
    dev = x - mu[None, :]
    # the sorted squared deviations without a second full sort: those of the sorted
    # column are the same values, already in two monotone runs (falling, then rising),
    # which a stable (run-merging) sort orders in one linear pass
    ds = xs - mu[None, :]
    sd = np.sqrt(np.sort(ds * ds, axis=0, kind="stable").sum(axis=0) / n)
    z = np.zeros_like(x)
    ok = sd > 0
    z[:, ok] = dev[:, ok] / sd[ok][None, :]
    return _row_sum(z) / k


def _weighted_vote(s: np.ndarray, p: float | None, weights) -> np.ndarray:
    """Each vote weighted by the influence that cast it: sum_k 1[I_k >= tau_k] * I_k (the
    paper's future work). I_k is already a mean over the benchmark's validation records, so
    benchmarks with many validation records do not weigh more."""
    if p is None:
        raise ValueError("method='wvote' needs p")
    v = votes(s, vote_thresholds(s, p))
    return _row_sum(np.where(v, s.astype(np.float64), 0.0))


def _filter(s: np.ndarray, p: float | None, weights) -> np.ndarray:
    """1 where the influence is in the top half of at least one benchmark (at or above eq. 4's
    threshold at p = 1/2), else 0: drops the records below every benchmark's median and does
    not rank the rest (pre-registration, section 5, rule 2 as a filter). One record is kept."""
    if s.shape[0] < 2:
        return np.ones(s.shape[0], dtype=np.float64)
    return votes(s, vote_thresholds(s, Fraction(1, 2))).any(axis=1).astype(np.float64)


#: How benchmarks' influences combine into one score per sample (Table 6, and the weighted
#: vote): name -> rule. The config's choices, the vote table's ``agg_*`` columns and the
#: evaluation's ``icons-<name>`` methods all read this registry; a new rule is one entry here.
AGGREGATIONS = {"vote": _vote, "mean": _mean, "max": _max, "rank": _rank, "norm": _norm, "wvote": _weighted_vote, "filter": _filter}
METHODS = tuple(AGGREGATIONS)


def aggregate(scores, method: str, p: float | None = None, weights=None) -> np.ndarray:
    """[N] float64 aggregate of the per-benchmark scores by the rule ``AGGREGATIONS[method]``
    (weights apply only to the vote)."""
    s = _check_scores(scores)
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if weights is not None and method != "vote":
        raise ValueError("weights apply only to method='vote'")
    return AGGREGATIONS[method](s, p, weights)


def id_hash(ids: Sequence[str]) -> np.ndarray:
    """[N] uint64: first 8 bytes, big-endian, of sha256(id.encode("utf-8")).

    A tie-break that depends only on the id, never on where the sample sits in a file.
    """
    buf = b"".join(hashlib.sha256(i.encode("utf-8")).digest()[:8] for i in ids)
    return np.frombuffer(buf, dtype=">u8").astype(np.uint64)


def top_k_mask(ids: Sequence[str], column, k: int) -> np.ndarray:
    """[N] bool: the k highest values of one column; ties at the cut by ``id_hash``, then id.

    Only rows tied at the cut value are hashed.
    """
    col = np.asarray(column)
    n = col.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    mask = np.zeros(n, dtype=bool)
    if k == 0:
        return mask
    cut = np.partition(col, n - k)[n - k]  # the k-th largest
    above = col > cut
    mask[above] = True
    tied = np.flatnonzero(col == cut)
    hashes = id_hash([ids[i] for i in tied.tolist()])
    ranked = sorted(range(len(tied)), key=lambda j: (int(hashes[j]), ids[tied[j]]))
    mask[tied[ranked[: k - int(above.sum())]]] = True
    return mask


def coverage_quota(m: int, k: int, coverage: float) -> int:
    """q = floor(coverage * m / k): places reserved for each benchmark's own top records."""
    fc = _as_fraction(coverage)
    if not 0 <= fc <= 1:
        raise ValueError(f"coverage must be in [0, 1], got {coverage!r}")
    return int(fc * m / k + _SLACK)


def _selection_order(ids: Sequence[str], agg: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Row indices sorted by (-agg, -secondary, id_hash, id): the module docstring's order.

    The same permutation as ``np.lexsort([id_hash(ids), -secondary, -agg])`` (plus the id
    string after a hash collision), but the hash is only computed for rows whose
    (agg, secondary) pair another row shares: the hash orders nothing else. At 665K rows
    and 10 benchmarks that is ~5% of the rows, and hashing was half of ``select``.
    """
    n = agg.shape[0]
    order = np.lexsort([-secondary, -agg])  # stable: equal pairs stay in row order for now
    if n < 2:
        return order
    a, r = agg[order], secondary[order]
    same = (a[1:] == a[:-1]) & (r[1:] == r[:-1])  # position i+1 continues i's run
    if not same.any():
        return order
    in_run = np.zeros(n, dtype=bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    pos = np.flatnonzero(in_run)  # positions (in ``order``) of rows sharing their pair
    run = np.cumsum(np.concatenate([[True], ~same]))[pos]  # run id, ascending along pos
    rows = order[pos]
    tied_ids = [ids[i] for i in rows.tolist()]
    h = id_hash(tied_ids)
    keys = [h, run]  # np.lexsort: last key is primary
    by_hash = np.lexsort(keys)
    collide = (run[by_hash][1:] == run[by_hash][:-1]) & (h[by_hash][1:] == h[by_hash][:-1])
    if collide.any():  # sha256 prefix collision inside a run: the id string decides
        _, str_rank = np.unique(np.asarray(tied_ids, dtype=str), return_inverse=True)
        keys.insert(0, str_rank.reshape(-1))
        by_hash = np.lexsort(keys)
    # runs occupy contiguous position blocks, so sorting the positions' contents by
    # (run, hash) and writing them back reorders each run in place
    order[pos] = rows[by_hash]
    return order


@dataclass(frozen=True)
class Selection:
    """Result of ``select``; arrays are indexed like the input rows."""

    order: np.ndarray  # [N] row indices from best to worst
    rank: np.ndarray  # [N] int64, 1 = best
    selected: np.ndarray  # [N] bool, exactly n_selected True
    n_selected: int
    cutoff_score: float  # aggregate value of the last selected sample
    n_tied_at_cutoff: int  # rows whose aggregate equals cutoff_score (selected or not)
    n_decided_by_tiebreak: int  # selected rows at cutoff_score while others at it were left out
    n_reserved: int = 0  # rows selected first as some benchmark's own top-q (coverage > 0)
    n_by_coverage: int = 0  # of those, rows the plain order would have left out
    group_quotas: dict[str, int] | None = None  # places per group (groups given)
    aggregate: np.ndarray | None = None  # [N] the value the order sorts by
    reserved_for: np.ndarray | None = None  # [N, K] bool: in benchmark k's reserved top-q (coverage > 0)
    reserve_per_benchmark: int = 0  # q


def selection_reasons(chosen: Selection, benchmarks: Sequence[str]) -> list[str]:
    """Why each row is in or out, in words a user reads (the exported subset's ``reason``):
    reserved by coverage for which benchmarks, above the cutoff, or at the cutoff and kept or
    left out by the tie-break, or below the cutoff."""
    if chosen.aggregate is None:
        raise ValueError("the selection carries no aggregate values (made by select())")
    cutoff, reasons = chosen.cutoff_score, []
    reserved = chosen.reserved_for if chosen.reserved_for is not None else np.zeros((len(chosen.rank), len(benchmarks)), dtype=bool)
    tie_decided = chosen.n_decided_by_tiebreak > 0
    for row in range(len(chosen.rank)):
        if reserved[row].any():
            names = ", ".join(b for b, r in zip(benchmarks, reserved[row], strict=True) if r)
            reasons.append(f"coverage: among the top {chosen.reserve_per_benchmark} of {names}")
        elif chosen.selected[row]:
            at_cut = chosen.aggregate[row] == cutoff and tie_decided
            reasons.append("vote: at the cutoff, kept by the tie-break" if at_cut else "vote: above the cutoff")
        else:
            at_cut = chosen.aggregate[row] == cutoff
            reasons.append("out: at the cutoff, left out by the tie-break" if at_cut else "out: below the cutoff")
    return reasons


def select(
    ids: Sequence[str],
    scores,
    p: float,
    method: str = "vote",
    weights=None,
    tiebreak: str = "mean-rank",
    coverage: float = 0.0,
    *,
    groups: Sequence[str] | None = None,
    group_shares: str = "pool",
) -> Selection:
    """Top m = subset_size(N, p) rows by ``aggregate(scores, method, p, weights)``.

    The order is the one in the module docstring (``tiebreak`` picks step 2); with
    ``coverage`` > 0 each benchmark's reserved top records come first. ``ids`` must be
    unique strings. ``groups`` (one label per row) asks for a quota fill instead of the
    plain cut: group g gets m * share_g places (largest remainders, ties by label), its
    share taken over the whole pool (``group_shares="pool"``) or over the rows with at least
    one vote ("voters"); each group fills its places in the order above. Not combined with
    ``coverage``.
    """
    s = _check_scores(scores)
    n, _ = s.shape
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} score rows")
    if not all(isinstance(i, str) for i in ids):
        raise TypeError("ids must be strings")
    if len(set(ids)) != n:
        raise ValueError("ids must be unique (a duplicated id makes the order depend on row order)")
    if tiebreak not in TIEBREAKS:
        raise ValueError(f"unknown tiebreak {tiebreak!r}; choose from {TIEBREAKS}")
    m = subset_size(n, p)
    quota = coverage_quota(m, s.shape[1], coverage)
    rank_agg = method == "rank" and weights is None
    # the per-column sorts behind the ranks, only where step 2 or the rank aggregate reads them
    r2 = _rank_sums2(s) if tiebreak != "id-hash" or rank_agg else None
    if tiebreak == "id-hash":
        secondary = np.zeros(n, dtype=np.int64)  # no step 2: id_hash orders equal aggregates
    else:
        # exact integers: the rank sum is proportional to the mean percentile rank
        secondary = r2.sum(axis=1) if tiebreak == "mean-rank" else r2.max(axis=1)
    if rank_agg:
        agg = _mean_rank_from_sums(r2, n)  # same as aggregate(s, "rank"), computed once
    else:
        agg = aggregate(s, method, p=p, weights=weights)
    order = _selection_order(ids, agg, secondary)
    quotas = None
    if groups is not None:
        if coverage:
            raise ValueError("a group quota fill and a coverage reserve do not combine; pass one")
        order, quotas = _quota_order(order, _check_groups(groups, n), m, _quota_reference(s, p, group_shares))
    reserved_for = np.zeros(s.shape, dtype=bool)
    for c in range(s.shape[1] if quota else 0):
        reserved_for[:, c] = top_k_mask(ids, s[:, c], quota)
    reserved = reserved_for.any(axis=1)
    n_by_coverage = 0
    if reserved.any():
        plain_selected = np.zeros(n, dtype=bool)
        plain_selected[order[:m]] = True
        n_by_coverage = int((reserved & ~plain_selected).sum())
        # reserved rows first, each part in the plain order (a stable partition)
        order = np.concatenate([order[reserved[order]], order[~reserved[order]]])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1, dtype=np.int64)
    selected = rank <= m
    # the cut is made among the rows that compete for the places left after the reserve
    competing = ~reserved
    cutoff = float(agg[order[m - 1]])
    at_cut = (agg == cutoff) & competing
    n_tied = int(at_cut.sum())
    left_out_at_cut = int((at_cut & ~selected).sum())
    decided = int((at_cut & selected).sum()) if left_out_at_cut else 0
    return Selection(
        order=order,
        rank=rank,
        selected=selected,
        n_selected=m,
        cutoff_score=cutoff,
        n_tied_at_cutoff=n_tied,
        n_decided_by_tiebreak=decided,
        n_reserved=int(reserved.sum()),
        n_by_coverage=n_by_coverage,
        group_quotas=quotas,
        aggregate=agg,
        reserved_for=reserved_for if quota else None,
        reserve_per_benchmark=quota,
    )


GROUP_SHARES = ("pool", "voters")


def _check_groups(groups: Sequence[str], n: int) -> list[str]:
    labels = [str(g) for g in groups]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} group labels for {n} score rows")
    return labels


def _quota_reference(s: np.ndarray, p: float, group_shares: str) -> np.ndarray:
    """[N] bool: the rows whose groups' shares set the quotas."""
    if group_shares == "pool":
        return np.ones(s.shape[0], dtype=bool)
    if group_shares == "voters":
        return votes(s, vote_thresholds(s, p)).any(axis=1)
    raise ValueError(f"unknown group_shares {group_shares!r}; choose from {GROUP_SHARES}")


def group_quotas(labels: Sequence[str], reference: np.ndarray, m: int) -> dict[str, int]:
    """Places per group: m times each group's share of the ``reference`` rows, rounded by
    largest remainders (ties by label), summing to m. Groups absent from the reference get 0."""
    counts: dict[str, int] = {}
    for label, ref in zip(labels, reference.tolist(), strict=True):
        counts[label] = counts.get(label, 0) + int(ref)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("no row is in the quota's reference set (no row has a vote)")
    exact = {g: Fraction(m * c, total) for g, c in counts.items()}
    quotas = {g: int(q) for g, q in exact.items()}  # floor (non-negative)
    left = m - sum(quotas.values())
    for g in sorted(exact, key=lambda g: (-(exact[g] - quotas[g]), g))[:left]:
        quotas[g] += 1
    return dict(sorted(quotas.items()))


def _quota_order(order: np.ndarray, labels: list[str], m: int, reference: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """The order with the quota fill's m rows first (each part keeping the given order)."""
    quotas = group_quotas(labels, reference, m)
    room = dict(quotas)
    chosen = np.zeros(len(labels), dtype=bool)
    for i in order.tolist():
        if room.get(labels[i], 0) > 0:
            room[labels[i]] -= 1
            chosen[i] = True
    # a quota never exceeds its group's rows (m <= the reference rows, which are the group's or fewer)
    assert int(chosen.sum()) == m
    return np.concatenate([order[chosen[order]], order[~chosen[order]]]), quotas
