"""Small, deterministic summaries of a selection that the pipeline shows as metadata.

These numbers are what a reader checks to trust a run: how much the per-benchmark
top-p selections agree (the paper's motivation for consensus), whether a planted
family of records is enriched in the selection, and how much of each benchmark's
voters survive into the final consensus set. All functions are pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from icons_dagster.core.selection.consensus import top_k_mask


def top_fraction_mask(scores: np.ndarray, p: float, ids: Sequence[str]) -> np.ndarray:
    """Boolean mask of the floor(p*N) highest scores (at least one when N > 0).

    Ties are broken by sha256(id) (first 8 bytes, big-endian, ascending) and then by
    the id itself, so the selection does not depend on record order or sort stability.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = scores.shape[0]
    if len(ids) != n:
        raise ValueError(f"scores has {n} entries but ids has {len(ids)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if n == 0:
        return np.zeros(0, dtype=bool)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return top_k_mask(ids, scores, max(1, min(n, int(math.floor(p * n)))))


def overlap_matrix(masks: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Pairwise overlap |A ∩ B| / |A| (row A, column B) of selections, names sorted.

    Low off-diagonal overlap is the paper's evidence that per-task selections disagree
    and a consensus step is needed. Rows with an empty selection are 0 (diagonal 1).
    """
    names = sorted(masks)
    stacked = (
        np.stack([np.asarray(masks[name], dtype=bool).reshape(-1) for name in names])
        if names
        else np.zeros((0, 0), dtype=bool)
    )
    k = len(names)
    out = np.zeros((k, k), dtype=np.float64)
    if k == 0:
        return names, out
    inter = stacked.astype(np.int64) @ stacked.T.astype(np.int64)
    sizes = stacked.sum(axis=1)
    for a in range(k):
        if sizes[a] > 0:
            out[a] = inter[a] / sizes[a]
    np.fill_diagonal(out, 1.0)
    return names, out


def family_enrichment(selected: np.ndarray, families: Sequence[str], family: str) -> float:
    """(share of ``family`` in the selection) / (share of ``family`` in the pool).

    Above 1 means the selector prefers the family. NaN when the family is absent
    from the pool or the selection is empty (the ratio is undefined, not infinite).
    """
    selected = np.asarray(selected, dtype=bool).reshape(-1)
    fam = np.asarray(list(families), dtype=object)
    if fam.shape[0] != selected.shape[0]:
        raise ValueError(f"selected has {selected.shape[0]} entries but families has {fam.shape[0]}")
    is_family = fam == family
    n_pool = fam.shape[0]
    n_sel = int(selected.sum())
    pool_share = float(is_family.sum()) / n_pool if n_pool else 0.0
    if pool_share == 0.0 or n_sel == 0:
        return float("nan")
    sel_share = float((is_family & selected).sum()) / n_sel
    return sel_share / pool_share


def family_shares(selected: np.ndarray, families: Sequence[str]) -> dict[str, float]:
    """Share of each family among the selected records (sorted keys; sums to 1).

    Families that occur in the pool but not in the selection appear with 0.0 so the
    keys are comparable across runs. An empty selection gives all zeros.
    """
    selected = np.asarray(selected, dtype=bool).reshape(-1)
    fam = list(families)
    if len(fam) != selected.shape[0]:
        raise ValueError(f"selected has {selected.shape[0]} entries but families has {len(fam)}")
    counts = {name: 0 for name in sorted(set(fam))}
    for name, chosen in zip(fam, selected):
        if chosen:
            counts[name] += 1
    total = sum(counts.values())
    return {name: (count / total if total else 0.0) for name, count in counts.items()}


def benchmark_coverage(selected: np.ndarray, votes: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Per benchmark, the fraction of its voters (``votes[:, k]``) that are selected.

    Shows whether consensus selection starves some benchmark: a low value means that
    benchmark's preferred samples were mostly outvoted. NaN for a benchmark with no voters.
    """
    selected = np.asarray(selected, dtype=bool).reshape(-1)
    votes = np.asarray(votes, dtype=bool)
    if votes.ndim != 2 or votes.shape[0] != selected.shape[0] or votes.shape[1] != len(names):
        raise ValueError(
            f"votes shape {votes.shape} does not match selected ({selected.shape[0]}) x names ({len(names)})"
        )
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        voters = votes[:, k]
        n_voters = int(voters.sum())
        out[str(name)] = float((voters & selected).sum()) / n_voters if n_voters else float("nan")
    return out
