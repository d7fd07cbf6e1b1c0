"""Per-benchmark influence (paper eq. 3), computed as one streaming pass.

Eq. 3 averages, over a benchmark's validation samples, the cosine between a training
sample's projected gradient and each validation gradient. Stored features are
L2-normalized, so each cosine is an inner product and

    mean_j <g_i, g'_j> = <g_i, mean_j g'_j>.

The benchmark's influence is therefore one matrix-vector product with the (unnormalized)
mean validation feature — no |D| x |V| matrix. For benchmarks reported per subtask
(e.g. MME) the influence is the max over the subtasks' means, as the official ICONS
code does for MME and LESS does for MMLU. Multi-checkpoint influence is the
learning-rate-weighted sum over checkpoints (paper's multi-epoch formula).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "normalize_rows",
    "mean_validation_feature",
    "influence_scores",
    "weighted_influence",
    "full_influence_matrix",
]

# float16 storage rounds each coordinate to ~5e-4 relative, so a normalized row read
# back has norm 1 ± ~1e-3. Anything further off was not normalized.
_NORM_TOL = 1e-2

# Rows per arithmetic tile (42 MB of float32 at d=5120); see _tiles.
TILE_ROWS = 2048


def normalize_rows(x: np.ndarray | torch.Tensor, eps: float = 1e-12):
    """L2-normalize rows in float32; returns ``(normalized, norms)`` of x's type.

    Rows with norm <= eps become exactly zero (not blown up); the caller sees them via
    ``norms`` and decides how to report them.
    """
    if isinstance(x, torch.Tensor):
        if x.ndim != 2:
            raise ValueError(f"expected [n, d], got {tuple(x.shape)}")
        xf = x.to(torch.float32)
        norms = torch.linalg.vector_norm(xf, dim=1)
        ok = norms > eps
        denom = torch.where(ok, norms, torch.ones_like(norms))
        out = torch.where(ok[:, None], xf / denom[:, None], torch.zeros_like(xf))
        return out, norms
    xf = np.asarray(x, dtype=np.float32)
    if xf.ndim != 2:
        raise ValueError(f"expected [n, d], got {xf.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", xf, xf, dtype=np.float64)).astype(np.float32)
    ok = norms > eps
    out = np.zeros_like(xf)
    out[ok] = xf[ok] / norms[ok, None]
    return out, norms


def _check_normalized(x: np.ndarray, what: str) -> None:
    xf = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", xf, xf, dtype=np.float64))
    bad = (np.abs(norms - 1.0) > _NORM_TOL) & (norms != 0.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{what}: {int(bad.sum())} rows are not L2-normalized (row {i} has norm "
            f"{norms[i]:.4g}); eq. 3 averages cosines, so features must be normalized"
        )


def mean_validation_feature(
    val_features: np.ndarray,
    subtasks: Sequence[str] | None = None,
    *,
    require_normalized: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """Mean validation feature per subtask group: ``([G, d] float32, sorted names)``.

    With ``subtasks=None`` there is one group named ``"__all__"``. The means are NOT
    re-normalized: the mean of cosines is the inner product with the plain mean.
    ``require_normalized`` rejects unnormalized rows (zero rows allowed), the bug that
    left one benchmark's scores not being cosines in the official release.
    """
    v = np.asarray(val_features)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"val_features must be a non-empty [m, d] array, got {v.shape}")
    if require_normalized:
        _check_normalized(v, "val_features")
    if subtasks is None:
        return v.astype(np.float64).mean(axis=0, keepdims=True).astype(np.float32), ["__all__"]
    labels = [str(s) for s in subtasks]
    if len(labels) != v.shape[0]:
        raise ValueError(f"{len(labels)} subtask labels for {v.shape[0]} validation rows")
    names = sorted(set(labels))
    lab = np.asarray(labels, dtype=object)
    means = np.empty((len(names), v.shape[1]), dtype=np.float32)
    for g, name in enumerate(names):
        means[g] = v[lab == name].astype(np.float64).mean(axis=0)
    return means, names


def _tiles(n: int, chunk_rows: int):
    """Yield (read_start, read_stop, [(tile_start, tile_stop), ...]) over n rows.

    Arithmetic always happens on TILE_ROWS-row tiles aligned to absolute row indices,
    whatever ``chunk_rows`` is: BLAS picks kernels (and summation orders) by matrix
    shape, so a row's score would otherwise change in the last bits with the chunking.
    ``chunk_rows`` only sets how many rows are read at a time (rounded up to a whole
    number of tiles).
    """
    if int(chunk_rows) < 1:
        raise ValueError("chunk_rows must be >= 1")
    step = TILE_ROWS * max(1, -(-int(chunk_rows) // TILE_ROWS))
    for i in range(0, n, step):
        j = min(n, i + step)
        yield i, j, [(t, min(j, t + TILE_ROWS)) for t in range(i, j, TILE_ROWS)]


def influence_scores(
    train_features: np.ndarray, mean_features: np.ndarray, chunk_rows: int = 65536
) -> np.ndarray:
    """``[n]`` float32: for each training row, max over groups of <train_row, mean_group>.

    ``train_features`` may be a float16 ``np.memmap``: it is read ``chunk_rows`` rows at
    a time and converted to float32 one ``TILE_ROWS`` tile at a time, so extra memory is
    about chunk_rows*d*itemsize + TILE_ROWS*d*4 bytes. float32 accumulation; results
    are bit-identical for any ``chunk_rows`` (see ``_tiles``).
    """
    if train_features.ndim != 2:
        raise ValueError(f"train_features must be [n, d], got {train_features.shape}")
    m = np.asarray(mean_features, dtype=np.float32)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"mean_features must be [G, {train_features.shape[1]}], got {m.shape}"
        )
    n = train_features.shape[0]
    out = np.empty(n, dtype=np.float32)
    mt = np.ascontiguousarray(m.T)
    for i, _, tiles in _tiles(n, chunk_rows):
        raw = np.asarray(train_features[i : tiles[-1][1]])
        for a, b in tiles:
            x = np.ascontiguousarray(raw[a - i : b - i], dtype=np.float32)
            out[a:b] = (x @ mt).max(axis=1)
    return out


def weighted_influence(per_checkpoint: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_c w_c * I_c`` (float64 accumulation, float32 result).

    Weights are the checkpoints' learning-rate weights: finite, non-negative, summing
    to 1 within 1e-6; all score arrays must have the same shape.
    """
    arrs = [np.asarray(a) for a in per_checkpoint]
    w = np.asarray(list(weights), dtype=np.float64)
    if len(arrs) == 0:
        raise ValueError("need at least one checkpoint")
    if w.shape != (len(arrs),):
        raise ValueError(f"{w.size} weights for {len(arrs)} checkpoints")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    if abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1 (got {w.sum():.9g})")
    shape = arrs[0].shape
    for a in arrs[1:]:
        if a.shape != shape:
            raise ValueError(f"checkpoint score shapes differ: {shape} vs {a.shape}")
    acc = np.zeros(shape, dtype=np.float64)
    for wc, a in zip(w, arrs):
        acc += wc * a.astype(np.float64)
    return acc.astype(np.float32)


def full_influence_matrix(
    train_features: np.ndarray, val_features: np.ndarray, chunk_rows: int = 65536
) -> np.ndarray:
    """The explicit ``[n, m]`` float32 matrix I_ij = <train_i, val_j>; only on request.

    The selection never needs it (see module docstring); it is for inspection.
    """
    v = np.asarray(val_features, dtype=np.float32)
    if train_features.ndim != 2 or v.ndim != 2 or v.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"shapes do not match: train {train_features.shape}, val {v.shape}"
        )
    n = train_features.shape[0]
    out = np.empty((n, v.shape[0]), dtype=np.float32)
    vt = np.ascontiguousarray(v.T)
    for i, _, tiles in _tiles(n, chunk_rows):
        raw = np.asarray(train_features[i : tiles[-1][1]])
        for a, b in tiles:
            x = np.ascontiguousarray(raw[a - i : b - i], dtype=np.float32)
            out[a:b] = x @ vt
    return out
