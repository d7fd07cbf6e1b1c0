"""Eq. 3 as a streaming mean-feature product, subtask max, chunking, checkpoint weights."""

import numpy as np
import pytest
import torch

from icons_dagster.core.influence import (
    TILE_ROWS,
    full_influence_matrix,
    influence_scores,
    mean_validation_feature,
    normalize_rows,
    weighted_influence,
)


def unit_f16(rng, n, d):
    x, _ = normalize_rows(rng.standard_normal((n, d)).astype(np.float32))
    return x.astype(np.float16)


def test_normalize_rows_numpy_and_torch():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-20, 0.0]], dtype=np.float32)
    y, norms = normalize_rows(x)
    assert y.dtype == np.float32 and norms.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0, 0], [0, 0]])
    np.testing.assert_allclose(norms, [5.0, 0.0, 1e-20])
    yt, nt = normalize_rows(torch.tensor(x, dtype=torch.float16))
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32
    torch.testing.assert_close(yt, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, 0.0]]))
    assert nt[1] == 0


def test_mean_identity_against_explicit_matrix():
    rng = np.random.default_rng(0)
    train = unit_f16(rng, 300, 64)
    val = unit_f16(rng, 40, 64)
    means, names = mean_validation_feature(val)
    assert names == ["__all__"] and means.shape == (1, 64) and means.dtype == np.float32
    full = full_influence_matrix(train, val)
    assert full.shape == (300, 40) and full.dtype == np.float32
    # eq. 3: mean over validation samples of the cosines
    np.testing.assert_allclose(influence_scores(train, means), full.mean(axis=1), atol=1e-5, rtol=0)
    # and the explicit matrix is the plain inner products
    np.testing.assert_allclose(
        full, train.astype(np.float64) @ val.astype(np.float64).T, atol=1e-5, rtol=0
    )


def test_subtask_max_by_hand():
    # 3 training rows, d = 2; validation rows grouped into subtasks "b" and "a":
    #   "a": [1, 0], [0, 1]  -> mean [0.5, 0.5]
    #   "b": [-1, 0]         -> mean [-1, 0]
    # group order is sorted: ["a", "b"]
    val = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=np.float16)
    means, names = mean_validation_feature(val, ["a", "b", "a"])
    assert names == ["a", "b"]
    np.testing.assert_array_equal(means, [[0.5, 0.5], [-1.0, 0.0]])
    train = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]], dtype=np.float16)
    # row0: a -> 0.5,  b -> -1   -> max 0.5
    # row1: a -> -0.5, b -> 1    -> max 1
    # row2: a -> -0.5, b -> 0    -> max 0
    np.testing.assert_array_equal(influence_scores(train, means), [0.5, 1.0, 0.0])
    # without subtasks it is the plain mean [0, 1/3]: row0 0, row1 0, row2 -1/3
    m_all, _ = mean_validation_feature(val)
    np.testing.assert_allclose(influence_scores(train, m_all), [0.0, 0.0, -1 / 3], atol=1e-7)


def test_unnormalized_validation_rejected():
    val = np.array([[2.0, 0.0], [0.0, 1.0]], dtype=np.float16)
    with pytest.raises(ValueError, match="not L2-normalized"):
        mean_validation_feature(val)
    # zero rows are allowed (reported by the caller), opting out is possible
    mean_validation_feature(np.array([[0.0, 0.0], [0.0, 1.0]], dtype=np.float16))
    mean_validation_feature(val, require_normalized=False)
    with pytest.raises(ValueError):
        mean_validation_feature(val[:1], ["a", "b"], require_normalized=False)


def test_chunking_invariance_bit_identical():
    rng = np.random.default_rng(1)
    n = 2 * TILE_ROWS + 123  # spans a partial last tile
    train = unit_f16(rng, n, 48)
    val = unit_f16(rng, 30, 48)
    for subtasks in (None, [f"g{i % 4}" for i in range(30)]):
        means, _ = mean_validation_feature(val, subtasks)
        ref = influence_scores(train, means, chunk_rows=10**9)
        for chunk in (1, 7, TILE_ROWS - 1, TILE_ROWS, 3 * TILE_ROWS + 5):
            np.testing.assert_array_equal(influence_scores(train, means, chunk_rows=chunk), ref)
    full = full_influence_matrix(train, val, chunk_rows=10**9)
    np.testing.assert_array_equal(full_influence_matrix(train, val, chunk_rows=7), full)


def test_memmap_input(tmp_path):
    rng = np.random.default_rng(2)
    train = unit_f16(rng, 500, 32)
    path = tmp_path / "train.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=train.shape)
    mm[:] = train
    mm.flush()
    ro = np.memmap(path, dtype=np.float16, mode="r", shape=train.shape)
    means, _ = mean_validation_feature(unit_f16(rng, 10, 32))
    got = influence_scores(ro, means, chunk_rows=64)
    np.testing.assert_array_equal(got, influence_scores(train, means))
    assert got.dtype == np.float32 and got.shape == (500,)


def test_weighted_influence():
    a = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    b = np.array([3.0, 2.0, 1.0], dtype=np.float32)
    np.testing.assert_allclose(weighted_influence([a, b], [0.25, 0.75]), [2.5, 2.0, 1.5])
    np.testing.assert_array_equal(weighted_influence([a], [1.0]), a)
    # sums within 1e-6 of 1 are accepted (e.g. learning rates normalized in float)
    weighted_influence([a, b], [0.3, 0.7 + 5e-7])
    for bad in ([0.5, 0.6], [1.0], [1.5, -0.5], [float("nan"), 1.0], [0.5, 0.5 + 2e-6]):
        with pytest.raises(ValueError):
            weighted_influence([a, b], bad)
    with pytest.raises(ValueError):
        weighted_influence([a, b[:2]], [0.5, 0.5])
    with pytest.raises(ValueError):
        weighted_influence([], [])


def test_shape_checks():
    with pytest.raises(ValueError):
        influence_scores(np.zeros((3, 4), np.float16), np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError):
        full_influence_matrix(np.zeros((3, 4), np.float16), np.zeros((2, 5), np.float16))
    with pytest.raises(ValueError):
        influence_scores(np.zeros((3, 4), np.float16), np.zeros((1, 4), np.float32), chunk_rows=0)
