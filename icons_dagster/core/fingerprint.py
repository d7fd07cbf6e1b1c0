"""Stable fingerprints of what produced an artifact.

A fingerprint is the first 16 hex digits of the SHA-256 of a canonical JSON document
(sorted keys, no whitespace). Artifact paths are derived from it, so a changed config
never reads a stale cache and an unchanged one never recomputes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
