"""Seeded random projectors for per-sample LoRA gradients.

Why this module exists: the official ICONS release projects gradients with a GPU
kernel whose random matrix depends on the GPU's SM count, so training and validation
features computed on different cards lived in different spaces. Here every entry of the
projection matrix P (D x dim) is a pure function of (kind, dim, seed[, s]) and the
*global* coordinate: it comes from a counter-based integer hash (splitmix64) evaluated
with numpy uint64 arithmetic on the CPU. P therefore never depends on the device, the
batch size, how the gradient vector is split into parameter blocks, torch's RNG state
or the thread count. Only the float32 summation order of ``block @ P`` may differ
between devices/batchings (≈1e-7 relative).

Gradients arrive as blocks: for each LoRA parameter tensor a ``[batch, n]`` slice of the
flattened per-sample gradient, starting at global coordinate ``offset`` of the
concatenated D-dimensional vector. ``project_block`` accumulates
``out[batch, dim] += block @ P[offset:offset+n, :]`` without materializing P for all D.

Hash definition (pinned by tests, do not change without bumping ``HASH_VERSION``)::

    splitmix64(x) = mix(x + 0x9E3779B97F4A7C15)  (mod 2**64), with
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        z =  z ^ (z >> 31)
    coordinate_hash(seed, c) = splitmix64(c XOR splitmix64(seed))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

__all__ = [
    "HASH_VERSION",
    "Projector",
    "CountSketchProjector",
    "DenseRademacherProjector",
    "make_projector",
    "coordinate_hash",
    "splitmix64",
]

HASH_VERSION = "splitmix64-xor-v1"

_M64 = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrapping arithmetic); returns a new array."""
    z = np.array(x, dtype=np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += _GAMMA
        z ^= z >> _S30
        z *= _MUL1
        z ^= z >> _S27
        z *= _MUL2
        z ^= z >> _S31
    return z


def _seed_key(seed: int) -> np.uint64:
    if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _M64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return splitmix64(np.array([int(seed)], dtype=np.uint64))[0]


def coordinate_hash(seed: int, coords: np.ndarray) -> np.ndarray:
    """Counter-based hash: ``splitmix64(coord XOR splitmix64(seed))`` as uint64.

    Stateless, so any coordinate's random bits can be regenerated on demand, in any
    order, in any process — the property that makes the projection hardware-independent.
    """
    c = np.asarray(coords)
    if c.dtype != np.uint64:
        if c.size and np.issubdtype(c.dtype, np.signedinteger) and c.min() < 0:
            raise ValueError("coordinates must be non-negative")
        c = c.astype(np.uint64)
    return splitmix64(c ^ _seed_key(seed))


class _LRU:
    """Byte-bounded LRU dict for per-(offset, n, device) projection pieces."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._d: OrderedDict[tuple, tuple[tuple[torch.Tensor, ...], int]] = OrderedDict()
        self._bytes = 0

    def get(self, key):
        hit = self._d.get(key)
        if hit is None:
            return None
        self._d.move_to_end(key)
        return hit[0]

    def put(self, key, tensors: tuple[torch.Tensor, ...]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if nbytes > self.max_bytes:
            return  # too large to cache: regenerate each time
        if key in self._d:
            self._bytes -= self._d.pop(key)[1]
        self._d[key] = (tensors, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes:
            _, (_, b) = self._d.popitem(last=False)
            self._bytes -= b

    def clear(self) -> None:
        self._d.clear()
        self._bytes = 0


class Projector(ABC):
    """Linear map R^D -> R^dim, defined blockwise by global coordinate."""

    kind: str
    dim: int
    seed: int

    def __init__(self, dim: int, seed: int, cache_bytes: int):
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        _seed_key(seed)  # validates
        self.dim = int(dim)
        self.seed = int(seed)
        self._cache = _LRU(cache_bytes)

    @abstractmethod
    def project_block(self, block: torch.Tensor, offset: int, out: torch.Tensor) -> None:
        """Accumulate ``out += block @ P[offset:offset+n]`` (out: float32, same device)."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """JSON-serializable identity of the matrix (what a cache key must include)."""

    @abstractmethod
    def inner_product_error_bound(self) -> str:
        """One line: the mean and variance of <Px, Py> around <x, y>."""

    def clear_cache(self) -> None:
        self._cache.clear()

    def _check(self, block: torch.Tensor, offset: int, out: torch.Tensor) -> int:
        if block.ndim != 2:
            raise ValueError(f"block must be [batch, n], got shape {tuple(block.shape)}")
        if out.ndim != 2 or out.shape[0] != block.shape[0] or out.shape[1] != self.dim:
            raise ValueError(
                f"out must be [{block.shape[0]}, {self.dim}], got {tuple(out.shape)}"
            )
        if out.dtype != torch.float32:
            raise TypeError(f"out must be float32, got {out.dtype}")
        if out.device != block.device:
            raise ValueError(f"out on {out.device} but block on {block.device}")
        if int(offset) < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        return int(block.shape[1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fingerprint()})"


class CountSketchProjector(Projector):
    """Sparse JL (CountSketch): each input coordinate j goes to ``s`` buckets.

    For t in 0..s-1: h = coordinate_hash(seed, j*s + t), bucket = h % dim, sign = +1 if
    bit 63 of h is 0 else -1, entry value sign/sqrt(s). The s hashes are independent, so
    two of them may hit the same bucket of column j (allowed, not avoided; entries then
    add, possibly cancelling). Scale 1/sqrt(s) makes every row of P have expected
    squared norm 1, hence unbiasedness.

    Error (independent hashing, exact): E<Sx,Sy> = <x,y>,
    Var<Sx,Sy> = (||x||²||y||² + <x,y>² - (2/s)·Σ_j x_j²y_j²)/dim
               <= (||x||²||y||² + <x,y>²)/dim <= 2||x||²||y||²/dim.
    For s=1 this equals the dense Rademacher variance; s>1 only thins the tails for
    inputs concentrated on few coordinates. Cost O(batch·n·s) per block, no matmul.
    """

    kind = "countsketch"

    def __init__(self, dim: int, seed: int, nnz_per_coord: int = 1, cache_bytes: int = 1 << 30):
        super().__init__(dim, seed, cache_bytes)
        if int(nnz_per_coord) < 1:
            raise ValueError(f"nnz_per_coord must be >= 1, got {nnz_per_coord}")
        self.nnz_per_coord = int(nnz_per_coord)

    def _tables(self, offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(buckets int64 [s, n], signs float32 [s, n]) for coordinates offset..offset+n-1."""
        s = self.nnz_per_coord
        coords = np.arange(offset, offset + n, dtype=np.uint64)
        counters = coords[None, :] * np.uint64(s) + np.arange(s, dtype=np.uint64)[:, None]
        h = coordinate_hash(self.seed, counters)
        buckets = (h % np.uint64(self.dim)).astype(np.int64)
        neg = (h >> np.uint64(63)).astype(np.float32)
        signs = (1.0 - 2.0 * neg) * np.float32(1.0 / math.sqrt(s))
        return buckets, signs.astype(np.float32)

    def project_block(self, block: torch.Tensor, offset: int, out: torch.Tensor) -> None:
        n = self._check(block, offset, out)
        if n == 0 or block.shape[0] == 0:
            return
        key = (int(offset), n, str(block.device))
        hit = self._cache.get(key)
        if hit is None:
            b, sg = self._tables(int(offset), n)
            hit = (
                torch.from_numpy(b).to(block.device),
                torch.from_numpy(sg).to(block.device),
            )
            self._cache.put(key, hit)
        idx, sign = hit
        x = block.to(torch.float32)
        for t in range(self.nnz_per_coord):
            out.index_add_(1, idx[t], x * sign[t])

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "nnz_per_coord": self.nnz_per_coord,
            "hash": HASH_VERSION,
        }

    def inner_product_error_bound(self) -> str:
        return (
            f"countsketch(s={self.nnz_per_coord}): E<Px,Py> = <x,y>; "
            f"Var = (|x|^2|y|^2 + <x,y>^2 - (2/s) sum_j x_j^2 y_j^2)/dim "
            f"<= 2|x|^2|y|^2/{self.dim}"
        )


class DenseRademacherProjector(Projector):
    """Dense Rademacher JL, the reference: P[j, k] = ±1/sqrt(dim).

    Bits: with W = ceil(dim/64) words per input coordinate, P[j, k] is negative iff bit
    (k mod 64) of coordinate_hash(seed, j*W + k//64) is 1 (one hash feeds 64 entries).
    Rows are generated ``chunk_coords`` at a time to bound memory and cached per
    (offset, n, device) within ``cache_bytes``; cost O(batch·n·dim) per block, so this
    is for small D or for validating the sparse projector.

    Error (exact): E<Px,Py> = <x,y>,
    Var<Px,Py> = (||x||²||y||² + <x,y>² - 2·Σ_j x_j²y_j²)/dim <= 2||x||²||y||²/dim.
    """

    kind = "rademacher"

    def __init__(self, dim: int, seed: int, chunk_coords: int = 4096, cache_bytes: int = 512 << 20):
        super().__init__(dim, seed, cache_bytes)
        if int(chunk_coords) < 1:
            raise ValueError("chunk_coords must be >= 1")
        self.chunk_coords = int(chunk_coords)
        self._words = (self.dim + 63) // 64

    def rows(self, start: int, count: int) -> np.ndarray:
        """P[start:start+count, :] as float32 numpy (for tests and inspection)."""
        W = self._words
        coords = np.arange(start, start + count, dtype=np.uint64)
        counters = coords[:, None] * np.uint64(W) + np.arange(W, dtype=np.uint64)[None, :]
        h = coordinate_hash(self.seed, counters)  # [count, W]
        # Force little-endian bytes so bit k of the integer is unpacked at position k
        # on any host.
        raw = np.ascontiguousarray(h.astype("<u8")).view(np.uint8)
        bits = np.unpackbits(raw, axis=1, bitorder="little")[:, : self.dim]
        scale = np.float32(1.0 / math.sqrt(self.dim))
        return (np.float32(1.0) - np.float32(2.0) * bits.astype(np.float32)) * scale

    def project_block(self, block: torch.Tensor, offset: int, out: torch.Tensor) -> None:
        n = self._check(block, offset, out)
        if n == 0 or block.shape[0] == 0:
            return
        x = block.to(torch.float32)
        dev = str(block.device)
        for c0 in range(0, n, self.chunk_coords):
            c = min(self.chunk_coords, n - c0)
            key = (int(offset) + c0, c, dev)
            hit = self._cache.get(key)
            if hit is None:
                hit = (torch.from_numpy(self.rows(int(offset) + c0, c)).to(block.device),)
                self._cache.put(key, hit)
            out.addmm_(x[:, c0 : c0 + c], hit[0])

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "hash": HASH_VERSION,
            "bits_per_hash": 64,
        }

    def inner_product_error_bound(self) -> str:
        return (
            "rademacher: E<Px,Py> = <x,y>; "
            f"Var = (|x|^2|y|^2 + <x,y>^2 - 2 sum_j x_j^2 y_j^2)/dim <= 2|x|^2|y|^2/{self.dim}"
        )


_KINDS: dict[str, type[Projector]] = {
    CountSketchProjector.kind: CountSketchProjector,
    DenseRademacherProjector.kind: DenseRademacherProjector,
}


def make_projector(kind: str, dim: int, seed: int, **kw: Any) -> Projector:
    """Build a projector by kind name ("countsketch" or "rademacher")."""
    try:
        cls = _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown projector kind {kind!r}; choose from {sorted(_KINDS)}") from None
    return cls(dim, seed, **kw)
