"""Images by content: each file's sha256, cached by (path, size, mtime), and a set's key.

Fingerprints take the pool's and the benchmarks' images by content, not by where they sit,
so a copied home or the same data under another mount point reuses every artifact. Hashing
665K images on every run would cost more than it saves: the cache (a SQLite file in the home,
``ArtifactStore.image_hash_cache``; several runs may update it at once) maps a file's
absolute path, size and mtime_ns to its sha256, so a rerun stats each image and reads none.
A moved, copied or rewritten file is hashed once more; a file modified less than
``RACY_SECONDS`` before it was hashed is not cached (a same-size rewrite in the same mtime
tick would otherwise go unseen).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from icons_dagster.core.data.records import LoadedRecords, Record
from icons_dagster.core.storage.fingerprint import file_sha256

RACY_SECONDS = 2
_TABLE = "image_sha256"
_SCHEMA = f"CREATE TABLE IF NOT EXISTS {_TABLE} (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL)"
_LOOKUP_CHUNK = 900  # below SQLite's oldest limit of 999 bound variables
_CHUNK = 4096  # files stat-ed, looked up or hashed (and committed) at a time
_STAT_BATCH = 256  # files stat-ed by one thread's task


@dataclass(frozen=True)
class ImageContent:
    """What a fingerprint knows of one image file."""

    size: int  # bytes
    sha256: str


class ImageHashCache:
    """sha256 of image files, kept in ``file`` (None: nothing is kept, every file is hashed)."""

    def __init__(self, file: Path | None, workers: int = 8):
        self.file = file
        self.workers = max(1, workers)

    def contents(self, records: Iterable[Record], log: Callable[[str], None] | None = None) -> dict[Path, ImageContent]:
        """Size and sha256 of every image the records name (by resolved path). Files are stat-ed
        and, when the cache lacks them, read in threads, a chunk at a time (bounded memory;
        each chunk's hashes are committed, so an interrupted first pass keeps its work)."""
        paths = sorted({r.image_path for r in records if r.image_path is not None}, key=os.fspath)
        found: dict[Path, ImageContent] = {}
        if not paths:
            return found
        now_ns = time.time_ns()
        with ThreadPoolExecutor(self.workers) as pool, closing(self._connect()) as cache:
            missing = []
            for chunk in _chunks(paths, _CHUNK):
                # threads for a slow disk or NFS, a batch each: one future per stat costs more than the stat
                stats = [stat for batch in pool.map(_stats, _chunks(chunk, _STAT_BATCH)) for stat in batch]
                cached = _lookup(cache, [str(p) for p in chunk])
                for path, (size, mtime_ns) in zip(chunk, stats, strict=True):
                    hit = cached.get(str(path))
                    if hit is not None and hit[:2] == (size, mtime_ns):
                        found[path] = ImageContent(size, hit[2])
                    else:
                        missing.append((path, size, mtime_ns))
            if missing and log is not None:
                log(f"hashing {len(missing)} of {len(paths)} image(s) the content cache does not hold")
            for chunk in _chunks(missing, _CHUNK):
                rows = []
                for (path, size, mtime_ns), sha in zip(chunk, pool.map(_sha256, [item[0] for item in chunk]), strict=True):
                    found[path] = ImageContent(size, sha)
                    if now_ns - mtime_ns > RACY_SECONDS * 1_000_000_000 and _stat(path) == (size, mtime_ns):
                        rows.append((str(path), size, mtime_ns, sha))
                _insert(cache, rows)
        return found

    def _connect(self) -> sqlite3.Connection:
        """The cache's database; an in-memory one when there is no file (nothing is kept)."""
        if self.file is None:
            connection = sqlite3.connect(":memory:")
        else:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.file, timeout=120)
        connection.execute(_SCHEMA)
        return connection


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _lookup(connection: sqlite3.Connection, paths: Sequence[str]) -> dict[str, tuple[int, int, str]]:
    out = {}
    for chunk in _chunks(paths, _LOOKUP_CHUNK):
        query = f"SELECT path, size, mtime_ns, sha256 FROM {_TABLE} WHERE path IN ({','.join('?' * len(chunk))})"
        out.update((path, (size, mtime_ns, sha)) for path, size, mtime_ns, sha in connection.execute(query, list(chunk)))
    return out


def _insert(connection: sqlite3.Connection, rows: list[tuple[str, int, int, str]]) -> None:
    if rows:
        with connection:
            connection.executemany(f"INSERT OR REPLACE INTO {_TABLE} (path, size, mtime_ns, sha256) VALUES (?, ?, ?, ?)", rows)


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as error:
        raise ValueError(f"image {path}: cannot be read to fingerprint it ({error.strerror or error})") from None
    return st.st_size, st.st_mtime_ns


def _stats(paths: Sequence[Path]) -> list[tuple[int, int]]:
    return [_stat(path) for path in paths]


def _sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as error:
        raise ValueError(f"image {path}: cannot be read to fingerprint it ({error.strerror or error})") from None


def images_key(loaded: LoadedRecords, contents: Mapping[Path, ImageContent]) -> str:
    """What a file's images contribute to a fingerprint, wherever they sit: sha256 over the
    sorted (relative path as written, file sha256) of every image its valid records name, and
    the indices of its skipped records (an image that appears, vanishes or stops decoding
    moves a record in or out). Text-only records name no image."""
    pairs = sorted({(r.image, contents[r.image_path].sha256) for r in loaded.records if r.image_path is not None})
    document = {"images": pairs, "skipped": sorted(p.index for p in loaded.problems)}
    return hashlib.sha256(json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")).hexdigest()
