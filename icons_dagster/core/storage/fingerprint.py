"""Stable fingerprints of what produced an artifact.

A fingerprint is the first 16 hex digits of the SHA-256 of a canonical JSON document
(sorted keys, no whitespace). Artifact paths are derived from it, so a changed config
never reads a stale cache and an unchanged one never recomputes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any

FINGERPRINT_LENGTH = 16
# Bump when a stage computes something different for the same config and inputs, so no
# artifact written by an older computation is reused.
ALGORITHM_VERSION = 2


def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__name__, **{k: _canonical(v) for k, v in dataclasses.asdict(value).items()}}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        raise ValueError("NaN cannot be fingerprinted")
    return value


def canonical_json(value: Any) -> str:
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(stage: str, **parts: Any) -> str:
    """Fingerprint of one stage from its config objects and its inputs' fingerprints."""
    document = canonical_json({"stage": stage, "algorithm": ALGORITHM_VERSION, **parts})
    return hashlib.sha256(document.encode("utf-8")).hexdigest()[:FINGERPRINT_LENGTH]


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# -- checkpoint identities: what a model folder or hub id computes, not where it sits

#: Files up to this size are content-hashed in a folder identity; larger ones by name + size.
CONTENT_HASH_LIMIT = 200 * 1024 * 1024
# Files that define what a checkpoint folder computes (README edits must not invalidate caches).
_IDENTITY_SUFFIXES = (".json", ".txt", ".model", ".safetensors", ".bin", ".tiktoken")


def _identity_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix in _IDENTITY_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def folder_state(folder: Path) -> tuple:
    """Cheap stat signature (names, sizes, mtimes): only decides when to re-hash or reload."""
    out = []
    for p in _identity_files(folder):
        st = p.stat()
        out.append((p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(out)


_identity_cache: dict[tuple, str] = {}
_identity_lock = threading.Lock()


def folder_identity(folder: str | Path) -> str:
    """sha256 identifying a checkpoint folder's content (not its mtimes or location).

    Covers config/tokenizer/processor files and weights: a file up to 200 MB enters by its
    own sha256, a larger one by name and size (hashing GBs of CLIP-L per run is not worth it;
    a retrained checkpoint of the same size must then change another file or its name).
    Cached per process on the folder's stat signature.
    """
    folder = Path(folder).resolve()
    key = (str(folder), folder_state(folder))
    with _identity_lock:
        cached = _identity_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for path in _identity_files(folder):
        rel = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        content = file_sha256(path) if size <= CONTENT_HASH_LIMIT else f"size:{size}"
        digest.update(json.dumps([rel, size, content]).encode("utf-8"))
    value = digest.hexdigest()
    with _identity_lock:
        _identity_cache[key] = value
    return value


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub load used: the snapshot folder its cached ``config.json`` sits in.

    transformers 5 no longer records ``config._commit_hash``; the hub cache layout
    (``models--org--name/snapshots/<commit>/``) is stable, so read it from there.
    None when it cannot be told (then only the requested revision identifies the model).
    """
    from transformers.utils.hub import cached_file

    try:
        path = cached_file(repo_id, "config.json", revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - best effort: any failure means "unknown"
        return None
    if path is None:
        return None
    snapshot = Path(path).parent
    if snapshot.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", snapshot.name):
        return snapshot.name
    return None


def checkpoint_identity(name_or_path: str, revision: str | None) -> dict[str, Any]:
    """A local folder by content (not by location); a hub id by id, revision and resolved commit."""
    if not name_or_path:
        return {"unset": True}  # no model configured yet (the code versions of an empty home)
    if Path(name_or_path).is_dir():
        return {"folder_sha256": folder_identity(name_or_path)}
    return {"hub_id": name_or_path, "revision": revision, "commit": _hub_commit(name_or_path, revision)}
