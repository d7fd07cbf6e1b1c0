"""Streaming reads of stored ``.npy`` feature files: plain file reads into reused buffers
(never a memory map, whose touched pages all count in RSS, and never a pickle), so peak
memory is set by the chunk size, not the file size. A file is a local path or an fsspec
URL (``s3://``, ``gs://``, ``file://``, ``memory://``): object storage is streamed the same
way, in ranged reads, without a local copy. A pass can also hash what it reads
(``digests``), so a file is checked against its artifact's manifest without a second read."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format


def is_url(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path


def open_binary(path: str | Path):
    """An unbuffered local file, or an fsspec file for a URL (its reads are ranged requests)."""
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb", buffering=0)


def _size(f) -> int:
    return int(f.size) if hasattr(f, "fs") else os.fstat(f.fileno()).st_size  # an fsspec file knows its size


@dataclass(frozen=True)
class NpyInfo:
    """Layout of a C-ordered 2-D ``.npy`` file: rows start at ``offset``, ``row_bytes`` apart."""

    path: str | Path  # a local path or an fsspec URL
    shape: tuple[int, int]
    dtype: np.dtype
    offset: int
    file_bytes: int  # the whole file's size (np.save writes nothing after the rows)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * self.dtype.itemsize


def npy_info(path: str | Path) -> NpyInfo:
    """Parse a ``.npy`` header (format 1.0 or 2.0, a local path or an fsspec URL) without
    reading the data.

    Refuses, naming the file: non-.npy files, object dtypes (pickled data),
    Fortran-ordered arrays (rows are not contiguous on disk), anything but 2-D, and
    files shorter than their header says.
    """
    path = path if is_url(path) else Path(path)
    with open_binary(path) as f:
        try:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = npy_format.read_array_header_2_0(f)
            else:
                raise ValueError(
                    f"format version {version[0]}.{version[1]} is not supported (1.0 and 2.0 are; "
                    "np.save writes 3.0 only for structured dtypes with non-latin-1 field names)"
                )
        except ValueError as exc:
            raise ValueError(f"{path}: cannot read .npy header: {exc}") from None
        offset = f.tell()
        size = _size(f)
    if dtype.hasobject:
        raise ValueError(
            f"{path}: dtype {dtype} holds Python objects (a pickled array); only plain numeric "
            "arrays can be streamed"
        )
    if len(shape) != 2:
        raise ValueError(f"{path}: expected a 2-D [rows, d] array, got shape {shape}")
    if fortran_order:
        raise ValueError(
            f"{path}: array is stored in Fortran (column-major) order, so its rows are not "
            "contiguous on disk; re-save it C-ordered (np.save(path, np.ascontiguousarray(a)))"
        )
    info = NpyInfo(path=path, shape=(int(shape[0]), int(shape[1])), dtype=dtype, offset=offset, file_bytes=size)
    need = offset + info.rows * info.row_bytes
    if size < need:
        raise ValueError(
            f"{path}: file has {size} bytes but its header ({info.shape}, {dtype}) needs {need}; "
            "it is truncated"
        )
    return info


def _read_rows(f, info: NpyInfo, start: int, out: np.ndarray) -> None:
    """Fill C-contiguous ``out`` ([r, d] of info.dtype) with rows start..start+r of ``f``."""
    mv = memoryview(out.reshape(-1).view(np.uint8))
    f.seek(info.offset + start * info.row_bytes)
    got = 0
    while got < len(mv):
        k = f.readinto(mv[got:])
        if not k:
            raise ValueError(
                f"{info.path}: file ended inside row {start + got // max(1, info.row_bytes)} "
                f"of {info.rows}; it is truncated"
            )
        got += k


@dataclass(frozen=True)
class FileDigest:
    """What a streaming pass read of one file: its size and the sha256 of its header and rows
    (the whole file unless something follows the rows, which ``file_bytes`` then shows)."""

    path: str | Path
    file_bytes: int
    sha256: str


def _read_header(f, info: NpyInfo) -> bytes:
    f.seek(0)
    header = b""
    while len(header) < info.offset:
        more = f.read(info.offset - len(header))
        if not more:
            raise ValueError(f"{info.path}: file ended inside its header")
        header += more
    return header


def stream_rows(
    paths: Sequence[str | Path], chunk_rows: int = 65536, *, digests: list[FileDigest] | None = None, prefetch: bool = True
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(file index, rows)`` of 2-D ``.npy`` files in order, ``chunk_rows`` at a time,
    each chunk a view of a reused buffer (copy what you keep). With ``digests`` (a list), once
    every chunk has been yielded it holds each file's ``FileDigest``, hashed from the bytes read."""
    if int(chunk_rows) < 1:
        raise ValueError("chunk_rows must be >= 1")
    infos = [npy_info(p) for p in paths]
    for (fi, _, _), rows in _prefetched_chunks(infos, row_jobs(infos, int(chunk_rows)), int(chunk_rows), prefetch, digests):
        yield fi, rows


def row_jobs(infos: Sequence[NpyInfo], step: int) -> list[tuple[int, int, int]]:
    """``(file, start, stop)`` reads of ``step`` rows covering every file in order (what
    ``_prefetched_chunks`` reads, and hashes in that order)."""
    return [(fi, a, min(info.rows, a + step)) for fi, info in enumerate(infos) for a in range(0, info.rows, step)]


def file_digests(infos: Sequence[NpyInfo], hashers: dict | None = None) -> list[FileDigest]:
    """Each file's digest: the hash a pass built (``hashers`` by file index), or its header's
    for a file it read no row of."""
    hashers = {} if hashers is None else hashers
    out = []
    for fi, info in enumerate(infos):
        if fi not in hashers:
            with open_binary(info.path) as f:
                hashers[fi] = hashlib.sha256(_read_header(f, info))
        out.append(FileDigest(info.path, info.file_bytes, hashers[fi].hexdigest()))
    return out


def _prefetched_chunks(
    infos: Sequence[NpyInfo], jobs: list[tuple[int, int, int]], step: int, prefetch: bool, digests: list[FileDigest] | None = None
):
    """Yield ``(job, rows)`` for ``jobs = [(file, start, stop)]``, in order.

    With ``prefetch`` a background thread reads job j+1 into the second of two buffers
    while the caller works on job j (file reads release the GIL, so a cold read
    overlaps the arithmetic). With ``digests``, jobs must cover each file's rows in order
    (as they are built here and in ``influence_scores_from_files``): the reading thread
    hashes each file's header and rows as it reads them, and once the last job has been
    yielded ``digests`` gets every file's ``FileDigest``.
    """
    nbytes = step * max(info.row_bytes for info in infos) if infos else 0
    bufs = [np.empty(max(1, nbytes), dtype=np.uint8) for _ in range(2 if prefetch else 1)]
    handles: dict[int, object] = {}
    hashers: dict[int, object] = {}

    def read(j: int):
        fi, a, b = jobs[j]
        info = infos[fi]
        rows = bufs[j % len(bufs)][: (b - a) * info.row_bytes].view(info.dtype).reshape(b - a, info.shape[1])
        f = handles.get(fi)
        if f is None:
            for other in list(handles):  # jobs are grouped by file: close the previous one
                handles.pop(other).close()
            f = handles[fi] = open_binary(info.path)
            if hasattr(os, "posix_fadvise") and not is_url(info.path):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if digests is not None:
                hashers[fi] = hashlib.sha256(_read_header(f, info))
        _read_rows(f, info, a, rows)
        if digests is not None:
            hashers[fi].update(rows)  # in the reading thread; hashlib releases the GIL
        return rows

    try:
        if not prefetch:
            for j, job in enumerate(jobs):
                yield job, read(j)
        else:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="npy-prefetch") as pool:
                pending = pool.submit(read, 0) if jobs else None
                for j, job in enumerate(jobs):
                    rows = pending.result()
                    pending = pool.submit(read, j + 1) if j + 1 < len(jobs) else None
                    yield job, rows
    finally:
        for f in handles.values():
            f.close()
    if digests is not None:
        digests.extend(file_digests(infos, hashers))
