"""The projection matrix is a pure function of (kind, dim, seed[, s]) and preserves geometry."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from icons_dagster.core.features.projection import (
    CountSketchProjector,
    DenseRademacherProjector,
    coordinate_hash,
    make_projector,
)

M64 = (1 << 64) - 1


def splitmix64_py(x: int) -> int:
    """Reference splitmix64 finalizer on Python ints (the published definition)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def coord_hash_py(seed: int, c: int) -> int:
    return splitmix64_py(c ^ splitmix64_py(seed))


def project(proj, x: torch.Tensor, splits=None) -> torch.Tensor:
    """Project rows of x [b, D], feeding blocks cut at ``splits`` (global offsets)."""
    out = torch.zeros(x.shape[0], proj.dim, dtype=torch.float32)
    cuts = [0, *(splits or []), x.shape[1]]
    for a, b in zip(cuts[:-1], cuts[1:]):
        proj.project_block(x[:, a:b], a, out)
    return out


def all_projectors(dim=64, seed=5):
    return [
        CountSketchProjector(dim, seed),
        CountSketchProjector(dim, seed, nnz_per_coord=3),
        DenseRademacherProjector(dim, seed, chunk_coords=37),
    ]


def test_coordinate_hash_pinned_against_pure_python():
    # splitmix64 of 0 is the well-known first output of splitmix64 seeded with 0
    assert splitmix64_py(0) == 0xE220A8397B1DCDAF
    coords = [0, 1, 123456789012]
    for seed in (0, 42, 2**63 + 7):
        got = coordinate_hash(seed, np.array(coords, dtype=np.uint64))
        assert got.dtype == np.uint64
        assert [int(v) for v in got] == [coord_hash_py(seed, c) for c in coords]


def test_countsketch_entries_pinned():
    dim, seed = 100, 42
    p = CountSketchProjector(dim, seed)
    for j in (0, 7, 99_999):
        h = coord_hash_py(seed, j)
        bucket, sign = h % dim, (-1.0 if h >> 63 else 1.0)
        e = torch.zeros(1, 1)
        e[0, 0] = 1.0
        out = torch.zeros(1, dim)
        p.project_block(e, j, out)  # a one-coordinate block at global offset j
        expected = torch.zeros(1, dim)
        expected[0, bucket] = sign
        assert torch.equal(out, expected)
    # s = 3: coordinate j uses hashes of j*3 + t, each entry ±1/sqrt(3)
    p3 = CountSketchProjector(dim, seed, nnz_per_coord=3)
    j = 5
    expected = torch.zeros(1, dim, dtype=torch.float64)
    for t in range(3):
        h = coord_hash_py(seed, j * 3 + t)
        expected[0, h % dim] += (-1.0 if h >> 63 else 1.0) / math.sqrt(3)
    out = torch.zeros(1, dim)
    p3.project_block(torch.ones(1, 1), j, out)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-7)


def test_dense_entries_pinned():
    dim, seed = 130, 9  # W = 3 words per coordinate, the last one partly used
    p = DenseRademacherProjector(dim, seed)
    for j in (0, 3, 54321):
        row = p.rows(j, 1)[0]
        for k in (0, 63, 64, 129):
            h = coord_hash_py(seed, j * 3 + k // 64)
            bit = (h >> (k % 64)) & 1
            assert row[k] == np.float32((-1.0 if bit else 1.0) / math.sqrt(dim))
        out = torch.zeros(1, dim)
        p.project_block(torch.ones(1, 1), j, out)
        assert torch.equal(out[0], torch.from_numpy(row))


@pytest.mark.parametrize("proj", all_projectors(), ids=lambda p: repr(p))
def test_block_splitting_and_batch_independence(proj):
    torch.manual_seed(0)
    D = 1000
    x = torch.randn(6, D)
    whole = project(proj, x)
    for splits in ([1], [10, 11, 500], sorted(np.random.default_rng(1).choice(D, 40, replace=False).tolist())):
        torch.testing.assert_close(project(proj, x, splits), whole, rtol=1e-5, atol=1e-5)
    # rows are independent: one at a time equals the batch
    singles = torch.cat([project(proj, x[i : i + 1], [333]) for i in range(6)])
    torch.testing.assert_close(singles, whole, rtol=1e-5, atol=1e-5)
    # half precision blocks are accepted (accumulated in float32)
    half = project(proj, x.half())
    torch.testing.assert_close(half, project(proj, x.half().float()), rtol=1e-5, atol=1e-5)


def test_matrix_does_not_depend_on_state_or_instance():
    x = torch.randn(3, 500)
    for kind, kw in [("countsketch", {}), ("countsketch", {"nnz_per_coord": 2}), ("rademacher", {})]:
        a = project(make_projector(kind, 32, 7, **kw), x)
        torch.manual_seed(123)  # torch RNG state is irrelevant
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # and so is the thread count
        try:
            b = project(make_projector(kind, 32, 7, **kw), x, [17, 250])
        finally:
            torch.set_num_threads(threads)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        c = project(make_projector(kind, 32, 8, **kw), x)
        assert not torch.allclose(a, c)


def test_same_matrix_in_another_process():
    code = "\n".join(
        [
            "import json, torch",
            "from icons_dagster.core.features.projection import make_projector",
            "x = torch.arange(300, dtype=torch.float32).reshape(1, 300) / 300",
            "res = {}",
            "for k in ('countsketch', 'rademacher'):",
            "    p = make_projector(k, 16, 99)",
            "    o = torch.zeros(1, 16)",
            "    p.project_block(x, 0, o)",
            "    res[k] = o[0].tolist()",
            "print(json.dumps(res))",
        ]
    )
    root = Path(__file__).resolve().parents[1]
    other = json.loads(subprocess.check_output([sys.executable, "-c", code], text=True, cwd=root))
    x = torch.arange(300, dtype=torch.float32).reshape(1, 300) / 300
    for k in ("countsketch", "rademacher"):
        o = project(make_projector(k, 16, 99), x)
        np.testing.assert_allclose(o[0].numpy(), other[k], rtol=1e-6, atol=1e-6)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.mark.parametrize(
    "kind,kw", [("countsketch", {}), ("countsketch", {"nnz_per_coord": 4}), ("rademacher", {})]
)
def test_fidelity_cosines_and_norms(kind, kw):
    D, dim, pairs = 20000, 1024, 50
    rng = np.random.default_rng(2024)
    x = _unit(rng.standard_normal((pairs, D)))
    # pairs with cosines spread over [-1, 1]
    c = rng.uniform(-0.95, 0.95, size=(pairs, 1))
    z = rng.standard_normal((pairs, D))
    y = _unit(c * x + np.sqrt(1 - c**2) * _unit(z - (z * x).sum(1, keepdims=True) * x))
    proj = make_projector(kind, dim, 11, **kw)
    X = torch.from_numpy(np.concatenate([x, y]).astype(np.float32))
    P = project(proj, X, [4096, 4097, 13000]).double().numpy()
    px, py = P[:pairs], P[pairs:]
    true_cos = (x * y).sum(1)
    # raw inner products: |<Px,Py> - <x,y>| <= eps for unit vectors, sd <= sqrt(2/dim) = 0.044
    ip_err = np.abs((px * py).sum(1) - true_cos)
    assert ip_err.max() < 0.2
    assert ip_err.mean() < 0.06
    cos_err = np.abs((_unit(px) * _unit(py)).sum(1) - true_cos)
    assert cos_err.max() < 0.2
    assert cos_err.mean() < 0.05
    # norms preserved in expectation: E||Px||^2 = ||x||^2 = 1, sd of the mean ~ 0.0045
    sq = (P**2).sum(1)
    assert abs(sq.mean() - 1.0) < 0.03
    assert np.all(np.abs(sq - 1.0) < 0.3)
    # the documented bound names the variance
    assert "Var" in proj.inner_product_error_bound()


def test_fingerprint_and_factory():
    for p in all_projectors():
        fp = p.fingerprint()
        assert json.loads(json.dumps(fp)) == fp
        assert fp["kind"] == p.kind and fp["dim"] == 64 and fp["seed"] == 5
    assert CountSketchProjector(8, 1, nnz_per_coord=2).fingerprint()["nnz_per_coord"] == 2
    # chunking is an implementation detail, not part of the matrix identity
    assert DenseRademacherProjector(8, 1, chunk_coords=3).fingerprint() == DenseRademacherProjector(8, 1).fingerprint()
    with pytest.raises(ValueError):
        make_projector("gaussian", 8, 1)
    with pytest.raises(ValueError):
        make_projector("countsketch", 0, 1)
    with pytest.raises(ValueError):
        make_projector("countsketch", 8, -1)


def test_project_block_checks():
    p = CountSketchProjector(8, 1)
    with pytest.raises(ValueError):
        p.project_block(torch.ones(2, 3), 0, torch.zeros(2, 7))
    with pytest.raises(TypeError):
        p.project_block(torch.ones(2, 3), 0, torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError):
        p.project_block(torch.ones(3), 0, torch.zeros(1, 8))
    out = torch.zeros(2, 8)
    p.project_block(torch.ones(2, 0), 5, out)  # empty block is a no-op
    assert not out.any()


def test_cache_is_bounded_and_transparent():
    p = CountSketchProjector(16, 3, cache_bytes=1000)  # tiny cache: entries get evicted
    x = torch.randn(2, 2000)
    a = project(p, x, list(range(100, 2000, 100)))
    b = project(p, x, list(range(100, 2000, 100)))
    assert p._cache._bytes <= 1000
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_projection_on_gpu():
    x = torch.randn(4, 3000)
    for p in all_projectors():
        cpu = project(p, x, [1000])
        out = torch.zeros(4, p.dim, device="cuda")
        p.project_block(x[:, :1000].cuda(), 0, out)
        p.project_block(x[:, 1000:].cuda(), 1000, out)
        torch.testing.assert_close(out.cpu(), cpu, rtol=1e-5, atol=1e-5)
