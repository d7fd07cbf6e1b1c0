"""What the asset checks verify: a well-formed pool, finite checkpoints, features finite and
unit-norm, finite influence of valid records, subsets of the right size holding no rejected record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from icons_dagster.core.data.pool import shard_keys
from icons_dagster.core.features.extraction import features_file
from icons_dagster.core.selection import consensus
from icons_dagster.core.storage.artifacts import ArtifactStore, CorruptArtifact, check_reads, digests_to_fill
from icons_dagster.core.storage.npy import FileDigest, stream_rows
from icons_dagster.core.stages.icons import INFLUENCE_FILE, SUBSET_JSON, load_pool_manifest
from icons_dagster.core.storage.refs import CheckpointRef, InfluenceRef, PoolRef, Ref


def check_features(store: ArtifactStore, ref: Ref, num_checkpoints: int, tolerance: float = 2e-3) -> tuple[bool, dict]:
    """Every stored feature is finite and unit-norm (float16 rounding within ``tolerance``), and
    each file is the one its manifest names (hashed from the same read): streamed where it is,
    so a shard on the shared store only is checked without a local copy."""
    stored = store.stored(ref.path)
    files = [(stored, features_file(c)) for c in range(num_checkpoints)]
    digests = digests_to_fill(files)
    passed, metadata = check_unit_rows([stored.file(name) for _, name in files], tolerance, digests)
    try:
        check_reads(files, digests)
    except CorruptArtifact as error:
        return False, {**metadata, "corrupt": str(error)}
    return passed, metadata


def check_unit_rows(files: list[str | Path], tolerance: float = 2e-3, digests: list[FileDigest] | None = None) -> tuple[bool, dict]:
    """Every row of every npy file (a path or URL) is finite with norm 1 (within ``tolerance``);
    rows = per file. ``digests``: filled as ``stream_rows`` fills it."""
    worst = 0.0
    finite = True
    rows = 0
    # Plain chunked reads: a memory map would count every page of the shard in RSS.
    for index, chunk in stream_rows(files, chunk_rows=65536, digests=digests):
        chunk = chunk.astype(np.float32)
        rows += chunk.shape[0] if index == len(files) - 1 else 0
        finite &= bool(np.isfinite(chunk).all())
        if chunk.size:
            worst = max(worst, float(np.abs(np.linalg.norm(chunk, axis=1) - 1.0).max()))
    passed = finite and worst <= tolerance
    return passed, {"rows": rows, "finite": finite, "max_norm_error": worst, "tolerance": tolerance}


def subset_ids(store: ArtifactStore, ref: Ref) -> list:
    """The ids of the exported subset's records, parsed once for the checks that read them."""
    records = json.loads((store.absolute(ref.path) / SUBSET_JSON).read_text(encoding="utf-8"))
    return [r.get("id") for r in records]


def check_subset(ids: list, n_pool: int, p: float) -> tuple[bool, dict]:
    """The subset holds exactly floor(p N) distinct records."""
    expected = consensus.subset_size(n_pool, p)
    passed = len(ids) == expected and len(set(ids)) == len(ids)
    return passed, {"n_records": len(ids), "expected": expected, "fraction": len(ids) / max(1, n_pool)}


def check_pool(store: ArtifactStore, ref: PoolRef) -> tuple[bool, dict]:
    """The manifest holds the records its reference counts (at least one), each id once, each
    in one of the configured shards."""
    manifest = load_pool_manifest(store, ref, columns=["id", "shard"])
    unique = manifest["id"].n_unique() == manifest.height
    unknown = sorted(set(manifest["shard"].unique().to_list()) - set(shard_keys(ref.num_shards)))
    passed = manifest.height == ref.n_records > 0 and unique and not unknown
    return passed, {"n_records": manifest.height, "expected": ref.n_records, "unique_ids": unique, "unknown_shards": unknown}


def pool_ids(store: ArtifactStore, pool_ref: PoolRef) -> set[str]:
    """The ids of the pool's valid records (what the later checks hold every id against)."""
    return set(load_pool_manifest(store, pool_ref, columns=["id"])["id"].to_list())


def check_checkpoint(store: ArtifactStore, ref: CheckpointRef) -> tuple[bool, dict]:
    """Every saved tensor (LoRA weights, Adam moments) of every checkpoint is finite, and the
    checkpoints' weights (mean learning rates, normalized) sum to 1."""
    from safetensors import safe_open

    files = sorted(store.absolute(ref.path).rglob("*.safetensors"))
    bad: list[str] = []
    tensors = 0
    for file in files:
        with safe_open(str(file), framework="pt") as tensors_in:
            for name in tensors_in.keys():
                tensors += 1
                if not bool(tensors_in.get_tensor(name).float().isfinite().all()):
                    bad.append(f"{file.name}:{name}")
    weight_sum = float(sum(c["weight"] for c in ref.checkpoints))
    passed = bool(files) and not bad and abs(weight_sum - 1.0) <= 1e-6
    return passed, {"files": len(files), "tensors": tensors, "non_finite": bad[:20], "weight_sum": weight_sum}


def check_influence(store: ArtifactStore, ref: InfluenceRef, pool_ids: set[str]) -> tuple[bool, dict]:
    """Every score is finite, every id appears once and is a valid pool record (records the
    featurization skipped are absent, and counted)."""
    frame = pl.read_parquet(store.absolute(ref.path) / INFLUENCE_FILE)
    scores = frame.select(pl.selectors.starts_with("influence")).to_numpy()
    ids = frame["id"]
    foreign = ids.filter(~ids.is_in(list(pool_ids))).to_list()
    passed = bool(np.isfinite(scores).all()) and ids.n_unique() == frame.height and not foreign
    return passed, {"rows": frame.height, "pool_records": len(pool_ids), "finite": bool(np.isfinite(scores).all()), "not_in_pool": foreign[:20]}


def check_subset_records(ids: list, pool_ids: set[str]) -> tuple[bool, dict]:
    """No record the pool stage rejected (or that is not in the pool) reaches the subset."""
    foreign = [i for i in ids if i not in pool_ids]
    return not foreign, {"n_records": len(ids), "not_in_valid_pool": foreign[:20]}
