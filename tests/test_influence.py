"""Eq. 3 as a streaming mean-feature product, subtask max, chunking, checkpoint weights."""

import numpy as np
import pytest
import torch

from icons_dagster.core.selection.influence import (
    TILE_ROWS,
    checkpoint_weighted_max,
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


def test_checkpoints_are_summed_per_subtask_before_the_max():
    # two checkpoints (weights 0.5, 0.5), two subtasks, one training row:
    #   checkpoint 0: subtask a 1.0, subtask b 0.0
    #   checkpoint 1: subtask a 0.0, subtask b 0.8
    # per subtask first (LESS, the paper's multi-epoch formula): a 0.5, b 0.4 -> max 0.5;
    # the max per checkpoint first would give 0.5 * 1.0 + 0.5 * 0.8 = 0.9
    ckpt0 = np.array([[1.0, 0.0]], dtype=np.float32)
    ckpt1 = np.array([[0.0, 0.8]], dtype=np.float32)
    np.testing.assert_allclose(checkpoint_weighted_max([ckpt0, ckpt1], [0.5, 0.5]), [0.5])
    # a second row where the orders agree: a 0.3 + 0.3, b 0.1 + 0.2 -> 0.3 either way
    two = [np.array([[1.0, 0.0], [0.3, 0.1]], np.float32), np.array([[0.0, 0.8], [0.3, 0.2]], np.float32)]
    np.testing.assert_allclose(checkpoint_weighted_max(two, [0.5, 0.5]), [0.5, 0.3], rtol=1e-6)
    # one group: the plain weighted sum; one checkpoint: the plain max, bit for bit
    plain = [np.array([0.2, -0.4], np.float32), np.array([0.6, 0.1], np.float32)]
    assert checkpoint_weighted_max([a[:, None] for a in plain], [0.25, 0.75]).tobytes() == weighted_influence(plain, [0.25, 0.75]).tobytes()
    assert checkpoint_weighted_max([two[0]], [1.0]).tobytes() == two[0].max(axis=1).tobytes()
    with pytest.raises(ValueError, match=r"\[n, G\]"):
        checkpoint_weighted_max([np.zeros(3, np.float32)], [1.0])


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


# --- streaming reads (stream_rows) and the many-benchmark pass --------------------------

import mmap  # noqa: E402
import tracemalloc  # noqa: E402
import warnings  # noqa: E402

from icons_dagster.core.selection.influence import influence_scores_from_files, stack_group_means  # noqa: E402
from icons_dagster.core.storage.npy import npy_info, stream_rows  # noqa: E402


@pytest.fixture
def no_mmap(monkeypatch):
    """Fail the test if anything memory-maps a file."""

    def refuse(*args, **kwargs):
        raise AssertionError("memory map used")

    monkeypatch.setattr(mmap, "mmap", refuse)
    monkeypatch.setattr(np, "memmap", refuse)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(37 * 5, dtype=np.float16).reshape(37, 5) / 7,
        np.arange(10 * 3, dtype=">f4").reshape(10, 3),  # big-endian: kept as stored
        np.arange(6 * 4, dtype=np.int32).reshape(6, 4),
        np.zeros((4, 0), dtype=np.float16),
    ],
)
def test_stream_rows_round_trip(tmp_path, array, no_mmap):
    path = tmp_path / "a.npy"
    np.save(path, array, allow_pickle=False)
    n = array.shape[0]
    for chunk in (1, 3, n, n + 5, 65536):
        for prefetch in (True, False):
            chunks = [c.copy() for _, c in stream_rows([path], chunk_rows=chunk, prefetch=prefetch)]
            assert [c.shape[0] for c in chunks[:-1]] == [min(chunk, n)] * (len(chunks) - 1)
            assert all(c.dtype == array.dtype for c in chunks)  # the file's dtype, byte order included
            np.testing.assert_array_equal(np.concatenate(chunks) if chunks else array[:0], array)
    # chunks are views of reused buffers (two with prefetch, taking turns): copy what you keep
    a, _, c = [rows for _, rows in stream_rows([path], chunk_rows=1)][:3]
    assert np.shares_memory(a, c) or array.shape[1] == 0
    a, b = [rows for _, rows in stream_rows([path], chunk_rows=1, prefetch=False)][:2]
    assert np.shares_memory(a, b) or array.shape[1] == 0


def test_stream_rows_empty_and_format_2(tmp_path):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 8), dtype=np.float16))
    assert list(stream_rows([empty])) == []
    v2 = tmp_path / "v2.npy"
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    with open(v2, "wb") as f:
        np.lib.format.write_array(f, x, version=(2, 0))
    assert npy_info(v2).shape == (4, 3)
    np.testing.assert_array_equal(np.concatenate([c.copy() for _, c in stream_rows([v2], 3)]), x)


def test_stream_rows_refuses_with_file_name(tmp_path):
    fortran = tmp_path / "fortran.npy"
    np.save(fortran, np.asfortranarray(np.arange(12.0).reshape(3, 4)))
    with pytest.raises(ValueError, match="fortran.npy.*Fortran"):
        next(stream_rows([fortran]))
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([[1, "a"], [None, 2.0]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects.npy.*objects"):
        next(stream_rows([objects]))
    flat = tmp_path / "flat.npy"
    np.save(flat, np.arange(5.0))
    with pytest.raises(ValueError, match="flat.npy.*2-D"):
        next(stream_rows([flat]))
    short = tmp_path / "short.npy"
    np.save(short, np.ones((10, 4), dtype=np.float16))
    with open(short, "r+b") as f:
        f.truncate(short.stat().st_size - 3)
    with pytest.raises(ValueError, match="short.npy.*truncated"):
        next(stream_rows([short]))
    text = tmp_path / "text.npy"
    text.write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="text.npy"):
        next(stream_rows([text]))
    with pytest.raises(ValueError):
        next(stream_rows([short], chunk_rows=0))


def _shards(tmp_path, rng, sizes, d, dtype=np.float16):
    arrays, paths = [], []
    for i, n in enumerate(sizes):
        x = unit_f16(rng, n, d).astype(dtype) if n else np.zeros((0, d), dtype)
        path = tmp_path / f"features-{i}.npy"
        np.save(path, x, allow_pickle=False)
        arrays.append(x)
        paths.append(path)
    return arrays, paths


def test_many_benchmarks_one_pass_equals_influence_scores(tmp_path, no_mmap):
    rng = np.random.default_rng(5)
    d = 24
    sizes = [TILE_ROWS + 37, 1, 0, 2 * TILE_ROWS]  # partial tiles, a 1-row and an empty shard
    arrays, paths = _shards(tmp_path, rng, sizes, d)
    # 4 benchmarks: one with 3 subtask groups, one with 2, two plain
    per_benchmark = [mean_validation_feature(unit_f16(rng, 9, d), [f"t{i % g}" for i in range(9)])[0] for g in (3, 1, 2, 1)]
    means, groups = stack_group_means(per_benchmark)
    assert groups == [(0, 3), (3, 4), (4, 6), (6, 7)] and means.shape == (7, d)
    ref = np.stack([np.concatenate([influence_scores(x, m) for x in arrays]) for m in per_benchmark], axis=1)
    for chunk in (1, TILE_ROWS, 3 * TILE_ROWS + 5):
        for kwargs in ({}, {"prefetch": False}, {"workers": 2}):
            got = influence_scores_from_files(paths, means, groups, chunk_rows=chunk, **kwargs)
            assert got.dtype == np.float32 and got.shape == (sum(sizes), 4)
            np.testing.assert_array_equal(got, ref)
    # a benchmark scored alone gets the bits it gets beside the others
    for k, span in enumerate(groups):
        np.testing.assert_array_equal(influence_scores_from_files(paths, means, [span])[:, 0], ref[:, k])
    # default groups: one benchmark over all mean rows, as influence_scores(x, means)
    np.testing.assert_array_equal(
        influence_scores_from_files(paths, means)[:, 0],
        np.concatenate([influence_scores(x, means) for x in arrays]),
    )
    # per-group scores: one "benchmark" per group row. Each equals influence_scores with
    # that group alone, and a benchmark's score is exactly the max of its groups' scores
    per_group = influence_scores_from_files(paths, means, [(g, g + 1) for g in range(7)])
    for g in range(7):
        np.testing.assert_array_equal(per_group[:, g], np.concatenate([influence_scores(x, means[g]) for x in arrays]))
    np.testing.assert_array_equal(per_group[:, 0:3].max(axis=1), ref[:, 0])
    np.testing.assert_array_equal(per_group[:, 4:6].max(axis=1), ref[:, 2])
    np.testing.assert_allclose(per_group, np.concatenate(arrays).astype(np.float64) @ means.T.astype(np.float64), atol=1e-5)


def test_streaming_subtask_max_by_hand(tmp_path):
    # the example of test_subtask_max_by_hand, from a file, beside a second benchmark
    means = np.array([[0.5, 0.5], [-1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    path = tmp_path / "train.npy"
    np.save(path, np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]], dtype=np.float16))
    got = influence_scores_from_files([path], means, [(0, 2), (2, 3)])
    np.testing.assert_array_equal(got, [[0.5, 0.0], [1.0, 0.0], [0.0, -1.0]])


def test_streaming_float32_files_and_memmap_agree(tmp_path):
    rng = np.random.default_rng(6)
    arrays, paths = _shards(tmp_path, rng, [TILE_ROWS + 3], 16, dtype=np.float32)
    means = rng.standard_normal((2, 16)).astype(np.float32)
    ro = np.load(paths[0], mmap_mode="r")
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "array is not writable"
        from_memmap = influence_scores(ro, means, chunk_rows=5)
    assert torch.get_num_threads() == threads  # the thread setting is restored
    np.testing.assert_array_equal(influence_scores_from_files(paths, means)[:, 0], from_memmap)
    np.testing.assert_array_equal(from_memmap, influence_scores(arrays[0].astype(np.float16).astype(np.float32), means))


def test_streaming_memory_is_bounded_by_the_chunk(tmp_path):
    rng = np.random.default_rng(7)
    d, chunk = 64, 2 * TILE_ROWS
    means = rng.standard_normal((3, d)).astype(np.float32)
    groups = [(0, 1), (1, 3)]
    extra = []
    influence_scores_from_files(_shards(tmp_path, rng, [3], d)[1], means, groups)  # one-time imports and setup
    for n in (8 * TILE_ROWS, 32 * TILE_ROWS):
        folder = tmp_path / str(n)
        folder.mkdir()
        _, paths = _shards(folder, rng, [n], d)
        tracemalloc.start()
        try:
            out = influence_scores_from_files(paths, means, groups, chunk_rows=chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        extra.append(peak - out.nbytes)
    # two read buffers + one float32 tile (+ small change: tracemalloc also counts what threads
    # left running by earlier tests allocate meanwhile), whatever the row count; a whole shard
    # (1 MiB of float16 at the larger n) would not fit
    bound = 2 * chunk * d * 2 + TILE_ROWS * d * 4 + 512 * 1024
    assert bound < 32 * TILE_ROWS * d * 2
    assert 2 * chunk * d * 2 <= max(extra) < bound, (extra, bound)  # (tracemalloc sees numpy's buffers)
    assert abs(extra[1] - extra[0]) < 64 * 1024, extra


def test_float16_conversion_is_exact():
    from icons_dagster.core.selection.influence import _aligned_empty, _to_float32

    bits = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    buf = _aligned_empty((256, 256), np.float32)
    got = _to_float32(bits, buf)
    want = bits.astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert got.ctypes.data % 64 == 0


def test_streaming_rejects_mismatches(tmp_path):
    rng = np.random.default_rng(8)
    _, paths = _shards(tmp_path, rng, [5, 5], 8)
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((3, 9), dtype=np.float16))
    with pytest.raises(ValueError, match="wide.npy.*d=9"):
        influence_scores_from_files([paths[0], wide], np.zeros((1, 8), np.float32))
    for bad in ([(0, 0)], [(1, 3)], [(2, 1)], [], [(0, 1, 2)]):
        with pytest.raises(ValueError):
            influence_scores_from_files(paths, np.zeros((2, 8), np.float32), bad)
    with pytest.raises(ValueError):
        influence_scores_from_files(paths, np.zeros((1, 8), np.float32), workers=0)
    with pytest.raises(ValueError):
        stack_group_means([np.zeros((1, 8)), np.zeros((1, 9))])
    assert influence_scores_from_files([], np.zeros((2, 8), np.float32), [(0, 1), (1, 2)]).shape == (0, 2)


def test_streaming_from_object_storage_gives_the_same_bits(tmp_path):
    """Shards under an fsspec URL (memory:// standing in for s3://, and file://) are streamed
    in ranged reads and score bit-identically to the local files; a truncated remote shard is
    refused naming its URL."""
    import fsspec

    rng = np.random.default_rng(9)
    d = 16
    _, paths = _shards(tmp_path, rng, [TILE_ROWS + 5, 3], d)
    means, groups = stack_group_means([unit_f16(rng, 2, d).astype(np.float32), unit_f16(rng, 1, d).astype(np.float32)])
    local = influence_scores_from_files(paths, means, groups)
    memory = fsspec.filesystem("memory")
    urls = []
    for path in paths:
        memory.pipe_file(f"/scores-test/{path.name}", path.read_bytes())
        urls.append(f"memory://scores-test/{path.name}")
    for shards in (urls, [f"file://{path}" for path in paths]):
        for kwargs in ({}, {"prefetch": False}, {"workers": 2}):
            np.testing.assert_array_equal(influence_scores_from_files(shards, means, groups, chunk_rows=TILE_ROWS, **kwargs), local)
    memory.pipe_file("/scores-test/cut.npy", paths[0].read_bytes()[:-10])
    with pytest.raises(ValueError, match="memory://scores-test/cut.npy.*truncated"):
        influence_scores_from_files(["memory://scores-test/cut.npy"], means, groups)
    memory.rm("/scores-test", recursive=True)


def test_a_streaming_pass_hashes_exactly_the_files_it_read(tmp_path):
    """``digests``: each file's size and sha256, from the bytes the pass read (local or an
    fsspec URL, prefetched or not, an empty shard too): those of the whole file, so a manifest's
    checksum is checked without a second read; a trailing byte shows in the size."""
    import fsspec

    from icons_dagster.core.storage.fingerprint import file_sha256

    rng = np.random.default_rng(4)
    d = 16
    _, paths = _shards(tmp_path, rng, [2 * TILE_ROWS + 7, 0, 5], d)
    means, groups = stack_group_means([unit_f16(rng, 2, d).astype(np.float32)])
    expected = [(p.stat().st_size, file_sha256(p)) for p in paths]
    memory = fsspec.filesystem("memory")
    for path in paths:
        memory.pipe_file(f"/digest-test/{path.name}", path.read_bytes())
    urls = [f"memory://digest-test/{path.name}" for path in paths]
    for shards in (paths, urls):
        for prefetch in (True, False):
            digests = []
            influence_scores_from_files(shards, means, groups, chunk_rows=TILE_ROWS, prefetch=prefetch, digests=digests)
            assert [(x.file_bytes, x.sha256) for x in digests] == expected
            assert [x.path for x in digests] == list(shards)
        streamed = []
        rows = sum(len(chunk) for _, chunk in stream_rows(shards, chunk_rows=100, digests=streamed))
        assert rows == 2 * TILE_ROWS + 12 and [(x.file_bytes, x.sha256) for x in streamed] == expected
    only_empty = []
    influence_scores_from_files([paths[1]], means, groups, digests=only_empty)
    assert [(x.file_bytes, x.sha256) for x in only_empty] == [expected[1]]
    # a byte after the rows: the rows hash as before, the size gives it away
    with open(paths[2], "ab") as f:
        f.write(b"\0")
    tail = []
    influence_scores_from_files([paths[2]], means, groups, digests=tail)
    assert tail[0].file_bytes == expected[2][0] + 1 and tail[0].sha256 == expected[2][1]
    # a pass stopped early reports nothing; more workers read out of order and cannot hash
    early = []
    next(stream_rows(paths, chunk_rows=100, digests=early))
    assert early == []
    with pytest.raises(ValueError, match="digests need workers=1"):
        influence_scores_from_files(paths, means, groups, workers=2, digests=[])
    memory.rm("/digest-test", recursive=True)
