"""The one place that owns every path: stage + fingerprint (+ partition) -> folder.

Artifacts are folders written whole: a temporary sibling is filled, a ``_COMPLETE.json``
manifest is written last, then the folder is renamed into place. A crash leaves only a
``.tmp-*`` folder that nothing reads; a folder without the manifest is never trusted.
Every temporary name carries its writer (``@host-pid``), so ``clean_leftovers`` (at the
start of each run) removes those of dead processes on this machine and never a live
writer's, nor another machine's.

Shared store (many machines): with ``remote`` set to an fsspec URL (``s3://bucket/icons``,
``gs://...``, ``file:///nfs/icons``, ``memory://`` in tests) every finished artifact is
also uploaded there, its files first and its manifest last, so on object storage too the
manifest is the commit point and a half-uploaded folder is never trusted. A machine that
lacks an artifact locally pulls it from the remote (into a temporary folder, renamed into
place) the first time a reader opens it (``absolute``). Reuse does not pull: a stage whose
artifact is committed on the remote reuses it as it is there, and the large feature files
are streamed from the remote where they are read (``stored``), never copied. Artifacts are
immutable (their folder is their fingerprint), so the local root is a cache that never goes
stale.

Integrity: the manifest lists every file of the artifact with its size and sha256
(``files``). A committed artifact is checked against it when it is reused and when a
downstream stage opens it (``absolute``; each file is hashed once per process while its
size and mtime stay put): a flipped byte or a truncated file is never trusted. A stage
recomputes a corrupt artifact of its own; a reader is told, by file, what is wrong.
A file streamed (``stored``) is checked from the bytes its reader read; a corrupt remote
copy is then quarantined (its manifest replaced by ``_CORRUPT.json``, which says why), so the
stage that owns it recomputes it on the next run instead of reusing it.
Artifacts committed before checksums (no ``files``) are trusted as before.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from icons_dagster.core.storage.fingerprint import file_sha256
from icons_dagster.core.storage.npy import FileDigest, open_binary
from icons_dagster.core.storage.refs import Ref, ref_from_json

COMPLETE_MARKER = "_COMPLETE.json"
CORRUPT_MARKER = "_CORRUPT.json"  # a quarantined remote copy: why it was not trusted
FILES_KEY = "files"  # in the manifest: {relative path: {"bytes": n, "sha256": hex}}
CONFIG_FILE = "icons.json"
UNPARTITIONED = "__unpartitioned__"
_COPY_CHUNK = 8 << 20  # bytes per read of a checked copy


class CorruptArtifact(ValueError):
    """A committed artifact whose files differ from its manifest."""


def file_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` (but the manifest): its size and sha256, by relative path."""
    files = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def file_problem(relative: str, expected: dict[str, Any], size: int, sha256: str | None) -> str | None:
    """What differs between a file's size and sha256 (None: its size alone) and its manifest
    entry, or None."""
    if size != expected["bytes"]:
        return f"{relative}: {size} bytes, its manifest says {expected['bytes']} (truncated or overwritten)"
    if sha256 is not None and sha256 != expected["sha256"]:
        return f"{relative}: sha256 differs from its manifest (the file changed after it was committed)"
    return None


_intact: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of files hashed and found right in this process


def _intact_key(path: Path) -> tuple[str, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path), stat.st_size, stat.st_mtime_ns


def integrity_problem(directory: Path) -> str | None:
    """What is wrong with a committed artifact's files, or None when they match its manifest
    (or it predates checksums)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{COMPLETE_MARKER} unreadable ({type(error).__name__})"
    files = manifest.get(FILES_KEY) if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return None
    for relative, expected in files.items():
        path = directory / relative
        if (key := _intact_key(path)) is None:
            return f"{relative}: missing"
        if key in _intact:
            continue
        problem = file_problem(relative, expected, key[1], None)  # the size first: a truncated file is not read
        if problem is None:
            problem = file_problem(relative, expected, key[1], file_sha256(path))
        if problem is not None:
            return problem
        _intact.add(key)
    return None


class RemoteStore:
    """Folders mirrored under an fsspec URL, by their path relative to the local root."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.url)
        self.base = self.base.rstrip("/")

    def _path(self, relative: str) -> str:
        return f"{self.base}/{relative}" if relative else self.base

    def has_file(self, relative: str) -> bool:
        return self.fs.exists(self._path(relative))

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self._path(relative))

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def url_of(self, relative: str) -> str:
        return f"{self.url}/{relative}" if relative else self.url

    def quarantine(self, relative: str, problem: str) -> None:
        """Withdraw a corrupt folder: its reason is written, then its manifest (the commit
        point) removed, so nothing trusts it and its stage recomputes it."""
        self.write_text(f"{relative}/{CORRUPT_MARKER}", json.dumps({"problem": problem}))
        self.fs.rm_file(self._path(f"{relative}/{COMPLETE_MARKER}"))

    def write_text(self, relative: str, text: str) -> None:
        target = self._path(relative)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(target, text.encode("utf-8"))

    def push(self, local: Path, relative: str) -> None:
        """Upload a complete artifact folder: every file, then the manifest."""
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
        for file in files:
            target = self._path(f"{relative}/{file.relative_to(local).as_posix()}")
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(file), target)
        if self.has_file(f"{relative}/{CORRUPT_MARKER}"):  # this upload replaces a quarantined copy
            self.fs.rm_file(self._path(f"{relative}/{CORRUPT_MARKER}"))
        self.fs.put_file(str(local / COMPLETE_MARKER), self._path(f"{relative}/{COMPLETE_MARKER}"))

    def pull(self, relative: str, local: Path) -> None:
        """Download a folder whose manifest is on the remote into ``local`` (atomically)."""
        tmp = local.parent / f".tmp-pull-{local.name}@{owner_tag()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            prefix = self._path(relative)
            for remote in sorted(self.fs.find(prefix)):
                target = tmp / remote[len(prefix) :].lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote, str(target))
            if not (tmp / COMPLETE_MARKER).is_file():
                raise FileNotFoundError(f"{self.url}/{relative} lost its {COMPLETE_MARKER} while being pulled")
            if local.exists():  # an incomplete leftover
                shutil.rmtree(local)
            os.replace(tmp, local)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


class ArtifactStore:
    """Paths under one root: artifacts/, refs/ (each asset's current reference), exports/,
    demo/, dagster/ (the Dagster instance), cache/ (this machine's image hashes) and
    icons.json (the configuration); ``remote``:
    an fsspec URL the artifacts and references are shared through (module docstring)."""

    def __init__(self, root: str | Path, remote: str | None = None):
        self.root = Path(root).expanduser().resolve()
        self.remote = RemoteStore(remote) if remote else None

    # -- locations ---------------------------------------------------------------------
    def artifact_dir(self, stage: str, fingerprint: str, partition: str | None = None) -> Path:
        base = self.root / "artifacts" / stage / fingerprint
        return base / _safe_component(partition) if partition is not None else base

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    @property
    def demo_dir(self) -> Path:
        return self.root / "demo"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster"

    @property
    def image_hash_cache(self) -> Path:
        """Each image file's sha256 by absolute path, size and mtime (``core/data/image_hashes.py``):
        keyed by this machine's paths, so it is never shared through the remote."""
        return self.root / "cache" / "image_sha256.sqlite"

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def watched_benchmarks_dir(self) -> Path:
        """The benchmarks folder of a home given none (OFA alone): the sensor watches it."""
        return self.root / "benchmarks"

    def export_path(self, name: str) -> Path:
        return self.exports_dir / name

    @staticmethod
    def ref_relative(asset: str, partition: str | None = None) -> str:
        """Where an asset's (partition's) current reference lives, relative to the root."""
        return f"refs/{asset}/{_safe_component(partition or UNPARTITIONED)}.json"

    def read_ref(self, asset: str, partition: str | None = None) -> Ref:
        """The current reference of an asset (partition), from the remote when there is one."""
        relative = self.ref_relative(asset, partition)
        where = f"{self.remote.url}/{relative}" if self.remote is not None else str(self.root / relative)
        label = f"{asset}{f'[{partition}]' if partition else ''}"
        if self.remote is not None:
            if not self.remote.has_file(relative):
                raise FileNotFoundError(f"{label} has not been materialized yet (no reference at {where})")
            return ref_from_json(json.loads(self.remote.read_text(relative)))
        if not (self.root / relative).is_file():
            raise FileNotFoundError(f"{label} has not been materialized yet (no reference at {where})")
        return ref_from_json(json.loads((self.root / relative).read_text(encoding="utf-8")))

    def has_ref(self, asset: str, partition: str | None = None) -> bool:
        relative = self.ref_relative(asset, partition)
        return self.remote.has_file(relative) if self.remote is not None else (self.root / relative).is_file()

    def write_ref(self, asset: str, partition: str | None, ref: Ref) -> None:
        """Store a reference locally (atomically) and on the remote."""
        relative = self.ref_relative(asset, partition)
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, ref.to_json())
        if self.remote is not None:
            self.remote.write_text(relative, path.read_text(encoding="utf-8"))

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    def absolute(self, relative: str) -> Path:
        """The local folder of an artifact reference (pulled from the remote when missing
        here), checked against its manifest: CorruptArtifact names the file when it is not."""
        path = self.root / relative
        if self.remote is not None:
            self.is_complete(path)
        if (path / COMPLETE_MARKER).is_file() and (problem := integrity_problem(path)) is not None:
            raise corrupt(path, problem)
        return path

    def stored(self, relative: str) -> StoredArtifact:
        """A committed artifact to read where it is: this machine's copy when it has one, else
        the remote's, streamed and never copied (see ``StoredArtifact``)."""
        directory = self.root / relative
        where = self.committed_where(directory)
        if where is None:
            raise FileNotFoundError(f"artifact {directory} is missing or incomplete (no {COMPLETE_MARKER} here or on the remote)")
        manifest = self.read_manifest(directory)
        files = manifest.get(FILES_KEY) if isinstance(manifest.get(FILES_KEY), dict) else None
        location = str(directory) if where == "local" else self.remote.url_of(relative)
        return StoredArtifact(self, relative, location, where == "local", files)

    def quarantined(self, directory: Path) -> str | None:
        """Why the remote withdrew this artifact's copy (``RemoteStore.quarantine``), if it did."""
        relative = f"{self.relative(directory)}/{CORRUPT_MARKER}"
        if self.remote is None or not self.remote.has_file(relative):
            return None
        return str(json.loads(self.remote.read_text(relative)).get("problem", "corrupt"))

    # -- completeness ------------------------------------------------------------------
    def committed_where(self, directory: Path) -> str | None:
        """``"local"`` when this machine holds the committed artifact, ``"remote"`` when only
        the remote does (nothing is pulled), None when neither; a local-only one is uploaded."""
        directory = Path(directory)
        local = (directory / COMPLETE_MARKER).is_file()
        if self.remote is None:
            return "local" if local else None
        relative = self.relative(directory)
        remote = self.remote.has_file(f"{relative}/{COMPLETE_MARKER}")
        if local and not remote:
            self.remote.push(directory, relative)
        return "local" if local else "remote" if remote else None

    def is_complete(self, directory: Path) -> bool:
        """Whether the artifact is complete; with a remote, the two copies are reconciled:
        a local-only one is uploaded (a run that died after committing locally), a
        remote-only one is pulled."""
        directory = Path(directory)
        where = self.committed_where(directory)
        if where == "remote":
            directory.parent.mkdir(parents=True, exist_ok=True)
            self.remote.pull(self.relative(directory), directory)
        return where is not None

    def read_manifest(self, directory: Path) -> dict[str, Any]:
        """A committed artifact's manifest: this machine's, else the remote's."""
        marker = Path(directory) / COMPLETE_MARKER
        if marker.is_file():
            return json.loads(marker.read_text(encoding="utf-8"))
        if self.remote is not None and self.remote.has_file(relative := f"{self.relative(directory)}/{COMPLETE_MARKER}"):
            return json.loads(self.remote.read_text(relative))
        raise FileNotFoundError(f"artifact {directory} is missing or incomplete (no {COMPLETE_MARKER})")

    @contextmanager
    def writing(self, directory: Path, manifest: dict[str, Any]) -> Iterator[Path]:
        """Yield a temporary folder; on success mark it complete and rename it to ``directory``."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".tmp-{directory.name}@{owner_tag()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            write_json(tmp / COMPLETE_MARKER, {**manifest, FILES_KEY: file_checksums(tmp)})
            if directory.exists():  # an incomplete leftover or a concurrent twin: replace it
                shutil.rmtree(directory)
            os.replace(tmp, directory)
            if self.remote is not None:
                self.remote.push(directory, self.relative(directory))
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def corrupt(where: str | Path, problem: str) -> CorruptArtifact:
    return CorruptArtifact(f"artifact {where} is corrupt: {problem}; it is not used (its stage recomputes it on the next run)")


class StoredArtifact:
    """A committed artifact read where it is (``ArtifactStore.stored``): ``location`` is this
    machine's folder or the remote's URL. Its readers check each file they read against the
    manifest from the bytes they read (``check``, ``read_bytes``): a mismatch raises
    CorruptArtifact naming the file, and a remote copy is quarantined so its stage recomputes it."""

    def __init__(self, store: ArtifactStore, relative: str, location: str, local: bool, files: dict | None):
        self.store, self.relative, self.location, self.local, self.files = store, relative, location, local, files

    def file(self, name: str) -> str | Path:
        """What a streaming reader opens: a local path, or a URL on the remote."""
        return Path(self.location) / name if self.local else f"{self.location}/{name}"

    def trusted(self, name: str) -> bool:
        """Whether this process already found this local file right (unchanged since): its
        readers need not hash it again. A remote file is hashed by every reader."""
        return self.local and _intact_key(Path(self.file(name))) in _intact

    def check(self, name: str, file_bytes: int, sha256: str) -> None:
        """Raise CorruptArtifact when what was read of ``name`` differs from the manifest."""
        if self.files is None:
            return  # committed before checksums: trusted as before
        expected = self.files.get(name)
        problem = f"{name}: not in its manifest" if expected is None else file_problem(name, expected, file_bytes, sha256)
        if problem is None:
            if self.local and (key := _intact_key(Path(self.file(name)))) is not None and key[1] == file_bytes:
                _intact.add(key)
            return
        if not self.local:
            self.store.remote.quarantine(self.relative, problem)
        raise corrupt(self.location, problem)

    def read_bytes(self, name: str) -> bytes:
        """A whole (small) file, checked."""
        sink = io.BytesIO()
        self.copy(name, sink)
        return sink.getvalue()

    def copy(self, name: str, sink: BinaryIO) -> None:
        """Write ``name`` to ``sink`` in chunks, checked from the bytes copied (one read; not
        hashed again when this process trusts it): on CorruptArtifact what ``sink`` holds
        must not be used."""
        digest = None if self.trusted(name) else hashlib.sha256()
        size = 0
        with open_binary(self.file(name)) as f:
            while chunk := f.read(_COPY_CHUNK):
                if digest is not None:
                    digest.update(chunk)
                sink.write(chunk)
                size += len(chunk)
        if digest is not None:
            self.check(name, size, digest.hexdigest())


def digests_to_fill(files: Sequence[tuple[StoredArtifact, str]]) -> list[FileDigest] | None:
    """A list for a streaming pass over ``files`` (artifact, file name) to fill with what it
    read, or None when this process already trusts them all (``StoredArtifact.trusted``)."""
    return None if all(stored.trusted(name) for stored, name in files) else []


def check_reads(files: Sequence[tuple[StoredArtifact, str]], digests: list[FileDigest] | None) -> None:
    """Check each file of a streaming pass against its manifest (``digests`` as the pass
    filled it; None: nothing to check): CorruptArtifact names the first that differs."""
    for (stored, name), digest in zip(files, digests or [], strict=digests is not None):
        stored.check(name, digest.file_bytes, digest.sha256)


def _safe_component(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in {".", ".."}:
        raise ValueError(f"unsafe path component {name!r}")
    return name


def owner_tag() -> str:
    """``host-pid`` of this process: who owns a temporary file or folder it writes."""
    return f"{socket.gethostname()}-{os.getpid()}"


def temporary_sibling(path: Path) -> Path:
    """A temporary file beside ``path`` (to fill, then ``os.replace`` onto it), named for its owner."""
    return path.with_name(f".{path.name}@{owner_tag()}.tmp")


# ".tmp-<name>@host-pid-<hex8>" folders, ".<name>@host-pid.tmp" files; before owners carried
# their host: "-pid-<hex8>" and ".pid.tmp" (read as this machine's)
_OWNED = re.compile(r"@(?P<host>.+)-(?P<pid>\d+)(?:-[0-9a-f]{8}|\.tmp)$")
_LEGACY = re.compile(r"(?:-(?P<pid>\d+)-[0-9a-f]{8}|\.(?P<pid2>\d+)\.tmp)$")
_SCAN_DEPTH = 4  # artifacts/<stage>/<fingerprint>/<partition>: temporaries sit beside these


def _is_temporary(name: str) -> bool:
    return name.startswith(".tmp-") or (name.startswith(".") and name.endswith(".tmp"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def owner_is_dead(tag: str, host: str) -> bool | None:
    """For an ``owner_tag()``: True when it is a dead process on ``host`` (this machine),
    False when alive here, None when another machine's (not ours to judge)."""
    owner_host, _, pid = tag.rpartition("-")
    if owner_host != host or not pid.isdigit():
        return None
    return not _pid_alive(int(pid))


def _dead_owner(name: str, host: str) -> bool | None:
    """True: its writer is a dead process on this machine; False: alive here; None: not ours to judge."""
    if (m := _OWNED.search(name)) is not None:
        return owner_is_dead(f"{m['host']}-{m['pid']}", host)
    if (m := _LEGACY.search(name)) is not None:
        return not _pid_alive(int(m["pid"] or m["pid2"]))
    return None


def clean_leftovers(root: str | Path) -> tuple[list[Path], list[Path]]:
    """Remove the temporary files and folders under the store's artifacts, refs and exports
    whose writer died on this machine; return (removed, kept: a live writer's or another
    machine's). Run at the start of each run; a folder being written is never touched."""
    root = Path(root)
    host = socket.gethostname()
    removed: list[Path] = []
    kept: list[Path] = []
    for top in ("artifacts", "refs", "exports"):
        base = root / top
        if not base.is_dir():
            continue
        for folder, dirs, files in os.walk(base):
            depth = len(Path(folder).relative_to(base).parts)
            temporary = [d for d in dirs if _is_temporary(d)]
            dirs[:] = [d for d in dirs if not _is_temporary(d)] if depth < _SCAN_DEPTH else []
            for name in temporary + [f for f in files if _is_temporary(f)]:
                path = Path(folder) / name
                if _dead_owner(name, host):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                    removed.append(path)
                else:
                    kept.append(path)
    return removed, kept


def write_json(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = temporary_sibling(path)
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def save_npy(path: Path, array: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
