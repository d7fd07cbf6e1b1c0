"""Bootstrap intervals on each method's Rel. difference to random (no Dagster, numpy only).

Why: a test split of 200 records gives a benchmark at 50% a standard error of 3.5 points,
so a Rel. difference of a few points is read as a win only with an interval beside it
(docs/preregistration-mix.md, section 4 "Statistics"). The protocol, exactly:

* the difference of a method's Rel. (eq. 2) to the mean Rel. of the random-<seed> methods;
* 2,000 resamples of test records within each benchmark, **paired** across methods: one
  resampled index matrix per benchmark serves every method, full and the random seeds
  included, so what all methods share (which records are hard) cancels out of the
  difference, and Rel. is recomputed each time (full's denominator is resampled too);
* the percentile interval (2.5%, 97.5%); a method beats random when it lies above 0.

Rel. here follows ``metrics.relative_scores``: a benchmark where full scores 0 (in the data
or in one resample) has no ratio and is left out of that mean. The benchmarks averaged are
chosen once by the caller (the informative ones, on the full data), never per resample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["CONFIDENCE", "RESAMPLES", "align_record_scores", "bootstrap_rel_differences", "format_interval"]

RESAMPLES = 2000  # pre-registered (section 4)
CONFIDENCE = 0.95  # the percentile interval (2.5%, 97.5%)


def align_record_scores(
    per_record: Mapping[str, Mapping[str, tuple[Sequence[str], Sequence[float] | np.ndarray]]],
    reference: str = "full",
    benchmarks: Sequence[str] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """{method: {benchmark: (ids, scores)}} -> {method: {benchmark: scores in ``reference``'s id order}}.

    Pairing needs every method scored on the same records; a method whose ids on a
    benchmark differ from the reference's (a record skipped for one model only, another
    test split) raises ValueError naming the method, the benchmark and a few of the ids.
    ``benchmarks``: those to align (default: every benchmark of ``reference``).
    """
    if reference not in per_record:
        raise ValueError(f"no per-record scores for {reference!r} (methods: {sorted(per_record)})")
    names = sorted(per_record[reference]) if benchmarks is None else list(benchmarks)
    order: dict[str, list[str]] = {}
    for name in names:
        if name not in per_record[reference]:
            raise ValueError(f"{reference}: no per-record scores for benchmark {name!r}")
        ids = [str(i) for i in per_record[reference][name][0]]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{reference}/{name}: duplicate record ids")
        order[name] = ids
    aligned: dict[str, dict[str, np.ndarray]] = {}
    for method, by_benchmark in per_record.items():
        aligned[method] = {}
        for name in names:
            if name not in by_benchmark:
                raise ValueError(f"{method}: no per-record scores for benchmark {name!r}")
            ids, scores = by_benchmark[name]
            ids = [str(i) for i in ids]
            values = np.asarray(scores, dtype=np.float64)
            if len(ids) != len(values):
                raise ValueError(f"{method}/{name}: {len(ids)} ids but {len(values)} scores")
            at = {record: k for k, record in enumerate(ids)}
            if len(at) != len(ids) or at.keys() != set(order[name]):
                missing = sorted(set(order[name]) - at.keys())[:3]
                extra = sorted(at.keys() - set(order[name]))[:3]
                raise ValueError(
                    f"{method}/{name}: the scored records differ from {reference}'s ({len(ids)} vs {len(order[name])} ids; "
                    f"missing e.g. {missing}, extra e.g. {extra}{', duplicates' if len(at) != len(ids) else ''}): "
                    "paired resampling needs every method scored on the same records"
                )
            aligned[method][name] = values[[at[record] for record in order[name]]]
    return aligned


def _rel(means: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Eq. 2 on [..., B] benchmark means: mean over benchmarks of means / full, those where full is 0 left out."""
    valid = np.broadcast_to(full != 0, means.shape)
    full = np.broadcast_to(full, means.shape)
    ratios = np.where(valid, means / np.where(valid, full, 1.0), 0.0)
    counts = valid.sum(axis=-1)
    return np.divide(ratios.sum(axis=-1), counts, out=np.full(counts.shape, np.nan), where=counts > 0)


def bootstrap_rel_differences(
    per_record: Mapping[str, Mapping[str, np.ndarray]],
    *,
    random_methods: Sequence[str],
    full: str = "full",
    benchmarks: Sequence[str] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    pooled: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, float]]:
    """{method: {"difference", "low", "high"}}: Rel.(method) - mean Rel.(random seeds), as fractions.

    ``per_record``: {method: {benchmark: per-record scores}}, aligned across methods (see
    ``align_record_scores``). ``benchmarks``: those Rel. averages (default: all of full's).
    The difference is the point estimate on the data as they are; ``low``/``high`` the
    percentile interval over ``resamples`` paired resamples. The index matrices are drawn
    from one seeded generator for every benchmark of ``full`` in sorted order, whatever
    ``benchmarks`` is, so Rel. and Rel. all see the same resamples and equal inputs give
    equal results.

    ``pooled``: {name: methods}, one more row per name: the mean of those methods'
    differences, in the data and in each resample (one method's runs over several pipeline
    seeds, scored on the same test records, read as one number with one interval).
    """
    if full not in per_record:
        raise ValueError(f"no {full!r} method: Rel. divides by the full-data score (methods: {sorted(per_record)})")
    if not random_methods:
        raise ValueError("no random-<seed> method to compare with")
    unknown = [m for m in random_methods if m not in per_record]
    if unknown:
        raise ValueError(f"random method(s) {unknown} have no per-record scores (methods: {sorted(per_record)})")
    pooled = dict(pooled or {})
    for name, members in pooled.items():
        missing = [m for m in members if m not in per_record]
        if not members or missing or name in per_record:
            why = "no method" if not members else f"unknown method(s) {missing}" if missing else "the name of a method"
            raise ValueError(f"pooled row {name!r}: {why} (methods: {sorted(per_record)})")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, not {resamples}")
    drawn = sorted(per_record[full])
    names = drawn if benchmarks is None else list(benchmarks)
    outside = [b for b in names if b not in per_record[full]]
    if outside:
        raise ValueError(f"{full}: no per-record scores for benchmark(s) {outside}")
    if not names:
        raise ValueError("no benchmark to average Rel. over")
    methods = list(per_record)
    for method in methods:
        for name in names:
            if name not in per_record[method]:
                raise ValueError(f"{method}: no per-record scores for benchmark {name!r}")
            n, expected = len(per_record[method][name]), len(per_record[full][name])
            if n != expected:
                raise ValueError(f"{method}/{name}: {n} per-record scores, {full} has {expected}: align them on record ids first")
            if n == 0:
                raise ValueError(f"{method}/{name}: no scored record")

    rng = np.random.Generator(np.random.PCG64(seed))
    column = {name: k for k, name in enumerate(names)}
    point = np.empty((len(methods), len(names)))
    sampled = np.empty((len(methods), resamples, len(names)))
    for name in drawn:  # every benchmark draws, used or not: the stream does not depend on ``benchmarks``
        n = len(per_record[full][name])
        index = rng.integers(0, n, size=(resamples, n))
        if name not in column:
            continue
        for i, method in enumerate(methods):
            scores = np.asarray(per_record[method][name], dtype=np.float64)
            point[i, column[name]] = scores.mean()
            sampled[i, :, column[name]] = scores[index].mean(axis=1)
    at_full = methods.index(full)
    randoms = [methods.index(m) for m in random_methods]
    rel_point = _rel(point, point[at_full])  # [M]
    rel_sampled = _rel(sampled, sampled[at_full])  # [M, R]
    differences = rel_point - rel_point[randoms].mean()
    sampled_differences = rel_sampled - rel_sampled[randoms].mean(axis=0)
    rows = [(method, differences[i], sampled_differences[i]) for i, method in enumerate(methods)]
    for name, members in pooled.items():
        at = [methods.index(m) for m in members]
        rows.append((name, differences[at].mean(), sampled_differences[at].mean(axis=0)))
    tail = 100 * (1 - confidence) / 2
    result = {}
    for name, difference, sampled in rows:
        finite = sampled[np.isfinite(sampled)]  # nan: full 0 on every benchmark of a resample
        low, high = np.percentile(finite, [tail, 100 - tail]) if finite.size else (np.nan, np.nan)
        result[name] = {"difference": float(difference), "low": float(low), "high": float(high)}
    return result


def format_interval(interval: Mapping[str, float] | None, scale: float = 100.0) -> str:
    """"+3.1 (+0.4, +5.9)": the difference and its interval in percentage points; "–" for none."""
    if interval is None or any(not np.isfinite(interval[k]) for k in ("difference", "low", "high")):
        return "–"
    # + 0.0 turns a rounded -0.0 (a difference of -1e-17) into +0.0
    low, difference, high = (round(scale * interval[k], 1) + 0.0 for k in ("low", "difference", "high"))
    return f"{difference:+.1f} ({low:+.1f}, {high:+.1f})"
