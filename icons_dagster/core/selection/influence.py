"""Per-benchmark influence (paper eq. 3), computed as one streaming pass.

Eq. 3 averages, over a benchmark's validation samples, the cosine between a training
sample's projected gradient and each validation gradient. Stored features are
L2-normalized, so each cosine is an inner product and

    mean_j <g_i, g'_j> = <g_i, mean_j g'_j>.

The benchmark's influence is therefore one matrix-vector product with the (unnormalized)
mean validation feature — no |D| x |V| matrix. For benchmarks reported per subtask
(e.g. MME) the influence is the max over the subtasks' means, as the official ICONS
code does for MME and LESS does for MMLU. Multi-checkpoint influence is the
learning-rate-weighted sum over checkpoints (paper's multi-epoch formula), taken per
subtask before the max over subtasks, as LESS does (``checkpoint_weighted_max``): the sum
is over each training/validation pair, so it comes before any max.

Streaming from disk: ``influence_scores_from_files`` reads stored ``.npy`` shards
(``storage/npy.py``) with plain file reads into reused buffers (never a memory map, whose
touched pages all count in RSS), so peak memory is set by the chunk size, not the
shard size. ``influence_scores_from_files`` scores MANY benchmarks in one pass over
the training features and gives, for each benchmark, exactly the bits that
``influence_scores`` gives for it alone (see ``_GroupMax``).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

from icons_dagster.core.storage.npy import FileDigest, _prefetched_chunks, _read_rows, npy_info, open_binary, row_jobs

__all__ = [
    "normalize_rows",
    "mean_validation_feature",
    "influence_scores",
    "influence_scores_from_files",
    "stack_group_means",
    "weighted_influence",
    "checkpoint_weighted_max",
    "full_influence_matrix",
]

# float16 storage rounds each coordinate to ~5e-4 relative, so a normalized row read
# back has norm 1 ± ~1e-3. Anything further off was not normalized.
_NORM_TOL = 1e-2

# Rows per arithmetic tile; see _tiles. 256 rows of float32 at d=5120 are 5 MiB, which
# stays in the last-level cache while every group's product reads it (2048-row tiles,
# 42 MiB, made each product a pass over main memory: ~3x slower at 10 benchmarks).
# Scores depend on this constant in the last bits (BLAS summation order follows the
# matrix shape), so changing it changes scores by ~1 float32 ulp of the row norm.
TILE_ROWS = 256


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
    step = _read_step(chunk_rows)
    for i in range(0, n, step):
        j = min(n, i + step)
        yield i, j, [(t, min(j, t + TILE_ROWS)) for t in range(i, j, TILE_ROWS)]


def _read_step(chunk_rows: int) -> int:
    if int(chunk_rows) < 1:
        raise ValueError("chunk_rows must be >= 1")
    return TILE_ROWS * max(1, -(-int(chunk_rows) // TILE_ROWS))


def _aligned_empty(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """Uninitialized C-contiguous array whose data starts on an ``align``-byte boundary.

    Every tile product reads from buffers made here, so the memory alignment BLAS sees
    is the same in every caller (kernels may treat unaligned heads differently).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    skip = (-raw.ctypes.data) % align
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


class _GroupMax:
    """The per-tile arithmetic shared by every influence function here.

    Benchmark k owns rows ``groups[k] = (a, b)`` of ``means``; a tile's score for k is
    ``max over g in [a, b) of <row, means[g]>``. Every group gets its own numpy
    matrix-vector product ``tile @ means[g]`` (float32 accumulation), and the max is
    exact, so a score depends only on the tile and that benchmark's mean vectors.
    That is on purpose: BLAS does not promise that a column of ``tile @ M`` has the
    same bits when M has other columns beside it (OpenBLAS switches kernels with the
    column count; measured: columns of a 12-column product differ from 1-, 2- or
    3-column products in the last bit), so one wide product for all benchmarks would
    make a benchmark's scores depend on which others were scored with it. With one
    product per group, scoring many benchmarks in one pass gives bit-for-bit the scores
    of scoring each alone, and a per-group score is bit-for-bit the one inside its
    benchmark's max. It is also the fast choice: OpenBLAS's gemv streams a
    cache-resident tile at ~70 GB/s, while its few-column gemm was slower than the
    same number of gemvs (a 3-column product took 1.7x three gemvs).
    """

    def __init__(self, means: np.ndarray, groups: Sequence[tuple[int, int]] | None, d: int | None = None):
        m = np.asarray(means, dtype=np.float32)
        if m.ndim == 1:
            m = m[None, :]
        if m.ndim != 2 or m.shape[0] == 0 or (d is not None and m.shape[1] != d):
            want = f"[G, {d}]" if d is not None else "[G, d]"
            raise ValueError(f"mean_features must be {want}, got {m.shape}")
        g_total = m.shape[0]
        spans = [(0, g_total)] if groups is None else [tuple(g) for g in groups]
        if not spans:
            raise ValueError("groups must name at least one benchmark")
        self.spans: list[tuple[int, int]] = []
        for span in spans:
            if len(span) != 2:
                raise ValueError(f"each group must be (start, stop), got {span!r}")
            a, b = (int(v) for v in span)
            if not 0 <= a < b <= g_total:
                raise ValueError(f"group {span!r} is not a non-empty slice of the {g_total} mean rows")
            self.spans.append((a, b))
        self.g_total = g_total
        self.vectors: dict[int, np.ndarray] = {}  # each on its own aligned buffer
        for g in sorted({g for a, b in self.spans for g in range(a, b)}):
            v = _aligned_empty((m.shape[1],), np.float32)
            v[...] = m[g]
            self.vectors[g] = v
        self.d = m.shape[1]

    @property
    def k(self) -> int:
        return len(self.spans)

    def __call__(self, x: np.ndarray, out: np.ndarray) -> None:
        """``out[:, k]`` = scores of the float32 tile ``x`` ([r, d]) for benchmark k."""
        r = x.shape[0]
        # one aligned row per group (row stride a multiple of 64 bytes), so a group's
        # product sees the same buffers whichever other groups are scored beside it
        per_group = _aligned_empty((self.g_total, -(-r // 16) * 16), np.float32)[:, :r]
        for g, v in self.vectors.items():
            np.matmul(x, v, out=per_group[g])
        for k, (a, b) in enumerate(self.spans):
            out[:, k] = per_group[a] if b - a == 1 else per_group[a:b].max(axis=0)


def _to_float32(src: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """Copy ``src`` ([r, d], r <= len(buf)) into ``buf[:r]`` as float32; return that view.

    float16 -> float32 is exact, so any converter gives the same values; torch's
    vectorized copy is ~10x faster than numpy's cast here. Other dtypes use numpy's
    cast (the same values ``np.asarray(src, np.float32)`` gives).
    """
    view = buf[: src.shape[0]]
    if src.dtype == np.float16 and src.dtype.isnative and src.flags.c_contiguous and src.size:
        torch.from_numpy(view).copy_(torch.from_numpy(src))
    else:
        np.copyto(view, src, casting="unsafe")
    return view


@contextmanager
def _tile_arithmetic():
    """Context for the tile loop: BLAS and torch on one thread each, no read-only warning.

    Each tile's work is small (a ~1 MB conversion, a cache-resident tile times a few
    columns): handing it to a thread pool costs more than it saves, and idle OpenMP
    threads spinning beside BLAS threads made the loop 3-4x slower on 2 cores
    (parallelism, where wanted, is over tiles: ``workers``). Pinning BLAS to one thread
    also keeps the arithmetic independent of the caller's thread settings.
    Both settings are process-wide and restored on exit. threadpoolctl ships with
    scikit-learn; without it BLAS keeps its own setting.
    """
    torch_threads = torch.get_num_threads()
    with warnings.catch_warnings(), ExitStack() as stack:
        # torch.from_numpy on a read-only np.memmap: we only read from it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            pass
        else:
            stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
        if torch_threads != 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if torch_threads != 1:
                torch.set_num_threads(torch_threads)


def influence_scores(
    train_features: np.ndarray, mean_features: np.ndarray, chunk_rows: int = 65536
) -> np.ndarray:
    """``[n]`` float32: for each training row, max over groups of <train_row, mean_group>.

    ``train_features`` may be a float16 ``np.memmap``: it is read ``chunk_rows`` rows at
    a time and converted to float32 one ``TILE_ROWS`` tile at a time, so extra memory is
    about chunk_rows*d*itemsize + TILE_ROWS*d*4 bytes (but a memory map's touched pages
    count in RSS; stream stored shards with ``influence_scores_from_files`` instead).
    float32 accumulation; results are bit-identical for any ``chunk_rows`` (see
    ``_tiles``) and to ``influence_scores_from_files`` on the same rows.
    """
    if train_features.ndim != 2:
        raise ValueError(f"train_features must be [n, d], got {train_features.shape}")
    n, d = train_features.shape
    kernel = _GroupMax(mean_features, None, d=d)
    out = np.empty((n, 1), dtype=np.float32)
    buf = _aligned_empty((max(1, min(TILE_ROWS, n)), d), np.float32)
    with _tile_arithmetic():
        for i, _, tiles in _tiles(n, chunk_rows):
            raw = np.asarray(train_features[i : tiles[-1][1]])
            for a, b in tiles:
                kernel(_to_float32(raw[a - i : b - i], buf), out[a:b])
    return out.reshape(n)


def stack_group_means(per_benchmark: Sequence[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Stack each benchmark's ``[G_k, d]`` (or ``[d]``) means into ``(means, groups)``.

    ``groups[k] = (start, stop)`` are benchmark k's rows of ``means``: the arguments of
    ``influence_scores_from_files``.
    """
    blocks = []
    groups: list[tuple[int, int]] = []
    start = 0
    for m in per_benchmark:
        m = np.asarray(m, dtype=np.float32)
        if m.ndim == 1:
            m = m[None, :]
        if m.ndim != 2 or m.shape[0] == 0:
            raise ValueError(f"each benchmark needs a non-empty [G, d] array of means, got {m.shape}")
        blocks.append(m)
        groups.append((start, start + m.shape[0]))
        start += m.shape[0]
    if not blocks:
        raise ValueError("no benchmarks given")
    if len({b.shape[1] for b in blocks}) != 1:
        raise ValueError(f"benchmarks' means differ in dimension: {sorted({b.shape[1] for b in blocks})}")
    return np.concatenate(blocks, axis=0), groups


def influence_scores_from_files(
    paths: Sequence[str | Path],
    means: np.ndarray,
    groups: Sequence[tuple[int, int]] | None = None,
    chunk_rows: int = 2048,
    *,
    workers: int = 1,
    prefetch: bool = True,
    digests: list[FileDigest] | None = None,
) -> np.ndarray:
    """Scores of every row of several ``.npy`` shards for MANY benchmarks in one pass.

    ``means`` is ``[G_total, d]`` (every benchmark's subtask-group means stacked; see
    ``stack_group_means``), ``groups[k] = (start, stop)`` the rows of benchmark k
    (default: one benchmark owning all rows). Returns float32 ``[total_rows, K]``,
    rows in file order then row order: column k is the max over benchmark k's groups
    of <row, mean_g>. For per-group scores pass one group per "benchmark",
    ``[(g, g + 1) for g in range(G_total)]``.

    Column k is bit-identical to ``influence_scores(np.load(path), means[a:b])`` for
    each file (tiles are aligned to each file's first row; one product per group, see
    ``_GroupMax``), whatever ``chunk_rows``/``workers`` and whichever other
    benchmarks are scored in the same pass. Files are read ``chunk_rows`` rows (rounded
    up to whole tiles) at a time with plain reads. ``workers=1`` computes on the
    calling thread while one helper thread reads the next chunk (``prefetch``);
    ``workers>1`` has that many threads each read and score whole chunks. Besides the
    ``[total_rows, K]`` float32 result, memory is about B * chunk_rows * d * itemsize +
    workers * TILE_ROWS * d * 4 bytes with B = 2 (workers=1 with prefetch), 1 (without)
    or ``workers``: independent of the number of rows. Files may differ in dtype (any
    real numeric) but not in d. ``digests`` (``workers=1`` only, whose reads are in file
    order): a list filled with each file's size and sha256, hashed from the bytes the pass
    read, so the caller checks them against a manifest without reading the files twice.
    """
    step = _read_step(chunk_rows)
    if int(workers) < 1:
        raise ValueError("workers must be >= 1")
    if digests is not None and int(workers) != 1:
        raise ValueError("digests need workers=1 (more workers read chunks out of order)")
    infos = [npy_info(p) for p in paths]
    d = infos[0].shape[1] if infos else None
    kernel = _GroupMax(means, groups, d=d)
    for info in infos:
        if info.dtype.kind not in "fiu":
            raise ValueError(f"{info.path}: dtype {info.dtype} is not a real number type")
        if info.shape[1] != kernel.d:
            raise ValueError(f"{info.path}: rows have d={info.shape[1]}, the means have d={kernel.d}")
    starts = np.concatenate([[0], np.cumsum([info.rows for info in infos], dtype=np.int64)])
    out = np.empty((int(starts[-1]), kernel.k), dtype=np.float32)
    jobs = row_jobs(infos, step)
    if not jobs and digests is None:  # no row to read, no header to report
        return out

    def score(job: tuple[int, int, int], rows: np.ndarray, buf: np.ndarray) -> None:
        fi, a, b = job
        base = int(starts[fi])
        for t in range(a, b, TILE_ROWS):  # a is a multiple of TILE_ROWS: tiles align to row 0
            u = min(b, t + TILE_ROWS)
            kernel(_to_float32(rows[t - a : u - a], buf), out[base + t : base + u])

    with _tile_arithmetic():
        if int(workers) == 1:
            buf = _aligned_empty((TILE_ROWS, kernel.d), np.float32)
            for job, rows in _prefetched_chunks(infos, jobs, step, prefetch, digests):
                score(job, rows, buf)
            return out
        local = threading.local()
        row_bytes = max(info.row_bytes for info in infos)

        def work(job: tuple[int, int, int]) -> None:
            if not hasattr(local, "buf"):
                local.raw = np.empty(max(1, step * row_bytes), dtype=np.uint8)
                local.buf = _aligned_empty((TILE_ROWS, kernel.d), np.float32)
            fi, a, b = job
            info = infos[fi]
            rows = local.raw[: (b - a) * info.row_bytes].view(info.dtype).reshape(b - a, info.shape[1])
            with open_binary(info.path) as f:
                _read_rows(f, info, a, rows)
            score(job, rows, local.buf)

        with ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="influence") as pool:
            for _ in pool.map(work, jobs):
                pass
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


def checkpoint_weighted_max(per_checkpoint: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``[n]`` float32: max over subtask groups g of sum_c w_c * I_c[:, g].

    ``per_checkpoint[c]`` is checkpoint c's ``[n, G]`` scores, one column per subtask group
    (G = 1 without subtasks). Summing over checkpoints first is the paper's multi-epoch
    formula per training/validation pair; the max over subtasks comes last. With one group
    or one checkpoint this is the plain weighted sum or the plain max, bit for bit.
    """
    arrs = [np.asarray(a) for a in per_checkpoint]
    if any(a.ndim != 2 or a.shape[1] == 0 for a in arrs):
        raise ValueError(f"each checkpoint needs [n, G] group scores, got {[a.shape for a in arrs]}")
    return weighted_influence(arrs, weights).max(axis=1)


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
    buf = _aligned_empty((max(1, min(TILE_ROWS, n)), v.shape[1]), np.float32)
    with _tile_arithmetic():
        for i, _, tiles in _tiles(n, chunk_rows):
            raw = np.asarray(train_features[i : tiles[-1][1]])
            for a, b in tiles:
                out[a:b] = _to_float32(raw[a - i : b - i], buf) @ vt
    return out
