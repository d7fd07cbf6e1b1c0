"""The stage kit: what every stage does around its own computation.

A stage names itself once: ``Stage(store, "warmup_subset", partition, **fingerprint_parts)``
derives its fingerprint and folder; ``reused()`` returns the committed artifact with that
fingerprint, if any; ``building(inputs)`` yields a temporary folder and the reference and
metadata to fill, and commits them atomically (the manifest is the commit point) with the
seconds the work took (``compute_seconds``) and the inputs' fingerprints (the lineage a user reads in the UI);
``result()`` is then the committed artifact. Nothing here is process-global: the clock
starts when ``reused()`` finds nothing, so ``compute_seconds`` covers model loads too (the
asset adds ``seconds``, the whole step's wall time in its run).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icons_dagster.core.storage.fingerprint import fingerprint
from icons_dagster.core.storage.artifacts import COMPLETE_MARKER, ArtifactStore, integrity_problem
from icons_dagster.core.storage.refs import Ref, make_ref

Log = Callable[[str], None]
Progress = Callable[..., None]  # (done, total, *extra): the asset logs it, throttled


def quiet_log(_: str) -> None:
    """The default log: stages run silently unless given one."""


@dataclass
class StageResult:
    ref: Ref  # where the artifact is, its fingerprint, what downstream stages need
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON values; "plots": {name: markdown}
    directory: Path | None = None  # the artifact's folder under the store's root now (what a user opens); None: on the remote only


@dataclass
class Output:
    """What a stage fills while building: its folder, its reference's fields (those of its
    type in ``storage/refs.py``) and its metadata."""

    folder: Path
    ref: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


class Stage:
    """One artifact of one stage: its fingerprint, folder, reuse, timing and commit."""

    def __init__(self, store: ArtifactStore, name: str, partition: str | None = None, /, **fingerprint_parts: Any):
        self.store = store
        self.name = name
        self.fingerprint = fingerprint(name, **fingerprint_parts)
        self.directory = store.artifact_dir(name, self.fingerprint, partition)
        self._started: float | None = None
        self.replaced: str | None = None  # why a committed copy was not trusted (corrupt)

    def reused(self) -> StageResult | None:
        """The committed, intact artifact with this fingerprint, or None (and the clock
        starts); a corrupt one is recomputed (``building`` replaces it) and the metadata says why.
        A copy on the shared remote only is reused where it is, without pulling it: its
        readers pull or stream what they read and check it then (``ArtifactStore.stored``)."""
        where = self.store.committed_where(self.directory)
        if where == "remote":
            return self._result(reused=True)
        if where == "local":
            self.replaced = integrity_problem(self.directory)
            if self.replaced is None:
                return self._result(reused=True)
        else:
            self.replaced = self.store.quarantined(self.directory)
        self._started = time.perf_counter()
        return None

    @contextmanager
    def building(self, inputs: dict[str, Any]) -> Iterator[Output]:
        """A temporary folder to write; on success the artifact is committed with its
        reference, metadata, ``compute_seconds`` and ``inputs`` (the fingerprints it was made from)."""
        started = self._started if self._started is not None else time.perf_counter()
        manifest: dict[str, Any] = {"stage": self.name, "fingerprint": self.fingerprint, "metadata": {}, "ref": {}}
        with self.store.writing(self.directory, manifest) as tmp:
            out = Output(tmp)
            yield out
            make_ref(self.name, self.fingerprint, "", False, out.ref)  # a field its type lacks fails before the commit
            manifest["ref"] = out.ref
            manifest["metadata"] = {**out.metadata, "compute_seconds": round(time.perf_counter() - started, 3), "inputs": inputs}
            if self.replaced is not None:
                manifest["metadata"]["replaced_corrupt_copy"] = self.replaced

    def result(self) -> StageResult:
        """The artifact just committed by ``building``."""
        return self._result(reused=False)

    def _result(self, reused: bool) -> StageResult:
        manifest = self.store.read_manifest(self.directory)
        relative = self.store.relative(self.directory)
        ref = make_ref(self.name, self.fingerprint, relative, reused, manifest.get("ref", {}))
        metadata = {**manifest.get("metadata", {}), "fingerprint": self.fingerprint, "reused": reused}
        if (self.directory / COMPLETE_MARKER).is_file():
            return StageResult(ref=ref, metadata=metadata, directory=self.directory)
        return StageResult(ref=ref, metadata={**metadata, "remote_location": self.store.remote.url_of(relative)})
