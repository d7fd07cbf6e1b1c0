"""What the asset checks verify: features finite and unit-norm, subsets of the right size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from icons_dagster.core.features.extraction import features_file
from icons_dagster.core.selection import consensus
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.core.storage.npy import iter_npy_rows
from icons_dagster.core.stages.icons import SUBSET_JSON
from icons_dagster.core.storage.refs import Ref


def check_features(store: ArtifactStore, ref: Ref, num_checkpoints: int, tolerance: float = 2e-3) -> tuple[bool, dict]:
    """Every stored feature is finite and unit-norm (float16 rounding within ``tolerance``)."""
    directory = store.absolute(ref.path)
    return check_unit_rows([directory / features_file(c) for c in range(num_checkpoints)], tolerance)


def check_unit_rows(files: list[Path], tolerance: float = 2e-3) -> tuple[bool, dict]:
    """Every row of every npy file is finite with norm 1 (within ``tolerance``); rows = per file."""
    worst = 0.0
    finite = True
    rows = 0
    for path in files:
        rows = 0
        # Plain chunked reads: a memory map would count every page of the shard in RSS.
        for chunk in iter_npy_rows(path, chunk_rows=65536):
            chunk = chunk.astype(np.float32)
            rows += chunk.shape[0]
            finite &= bool(np.isfinite(chunk).all())
            if chunk.size:
                worst = max(worst, float(np.abs(np.linalg.norm(chunk, axis=1) - 1.0).max()))
    passed = finite and worst <= tolerance
    return passed, {"rows": rows, "finite": finite, "max_norm_error": worst, "tolerance": tolerance}


def check_subset(store: ArtifactStore, ref: Ref, n_pool: int, p: float) -> tuple[bool, dict]:
    """The subset JSON parses and holds exactly floor(p N) records."""
    expected = consensus.subset_size(n_pool, p)
    records = json.loads((store.absolute(ref.path) / SUBSET_JSON).read_text(encoding="utf-8"))
    ids = [r.get("id") for r in records]
    passed = len(records) == expected and len(set(ids)) == len(ids)
    return passed, {"n_records": len(records), "expected": expected, "fraction": len(records) / max(1, n_pool)}
