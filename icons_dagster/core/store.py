"""The one place that owns every path: stage + fingerprint (+ partition) -> folder.

Artifacts are folders written whole: a temporary sibling is filled, a ``_COMPLETE.json``
manifest is written last, then the folder is renamed into place. A crash leaves only a
``.tmp-*`` folder that nothing reads; a folder without the manifest is never trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

COMPLETE_MARKER = "_COMPLETE.json"


class ArtifactStore:
    """Paths under one root: artifacts/, exports/, demo/, dagster/ (the Dagster instance)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

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

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    # -- completeness ------------------------------------------------------------------
    @staticmethod
    def is_complete(directory: Path) -> bool:
        return (Path(directory) / COMPLETE_MARKER).is_file()

    @staticmethod
    def read_manifest(directory: Path) -> dict[str, Any]:
        marker = Path(directory) / COMPLETE_MARKER
        if not marker.is_file():
            raise FileNotFoundError(f"artifact {directory} is missing or incomplete (no {COMPLETE_MARKER})")
        return json.loads(marker.read_text(encoding="utf-8"))

    @contextmanager
    def writing(self, directory: Path, manifest: dict[str, Any]) -> Iterator[Path]:
        """Yield a temporary folder; on success mark it complete and rename it to ``directory``."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            write_json(tmp / COMPLETE_MARKER, manifest)
            if directory.exists():  # an incomplete leftover or a concurrent twin: replace it
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _safe_component(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in {".", ".."}:
        raise ValueError(f"unsafe path component {name!r}")
    return name


def write_json(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def save_npy(path: Path, array: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
