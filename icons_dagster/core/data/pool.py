"""The pool manifest: one validated row per record, with its content hash and shard.

Shards are a stable hash of the record id modulo the shard count, so the partition set is
fixed by configuration and adding records touches only their own shards. Images are kept
as the records write them, relative to the image root, with their size: a reader resolves
them against the image root configured now, so a moved home or image folder keeps its
manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from icons_dagster.core.data.image_hashes import ImageContent
from icons_dagster.core.data.records import ImageRoot, Record, Turn

MANIFEST_FILE = "manifest.parquet"
PROBLEMS_FILE = "problems.json"
# Bump when the manifest's columns change (2: ``image_bytes`` replaced the absolute ``image_path``).
MANIFEST_VERSION = 2


def shard_keys(num_shards: int) -> list[str]:
    width = max(4, len(str(num_shards - 1)))
    return [f"shard-{i:0{width}d}" for i in range(num_shards)]


def shard_of(record_ids: Sequence[str], num_shards: int) -> np.ndarray:
    """Shard index of each id: first 8 bytes of sha256(id) modulo the shard count."""
    return np.array(
        [int.from_bytes(hashlib.sha256(i.encode("utf-8")).digest()[:8], "big") % num_shards for i in record_ids],
        dtype=np.int64,
    )


def build_manifest(records: Sequence[Record], num_shards: int, images: Mapping[Path, ImageContent]) -> pl.DataFrame:
    """``images``: each image's content, by the records' resolved paths (``ImageHashCache.contents``)."""
    ids = [r.id for r in records]
    keys = shard_keys(num_shards)
    return pl.DataFrame(
        {
            "id": ids,
            "index": [r.index for r in records],
            "image": [r.image for r in records],
            "image_bytes": [images[r.image_path].size if r.image_path else None for r in records],
            "n_turns": [len(r.turns) for r in records],
            "n_text_chars": [sum(len(t.text) for t in r.turns) for r in records],
            "content_sha256": [hashlib.sha256(r.raw_json.encode("utf-8")).hexdigest() for r in records],
            "shard": [keys[s] for s in shard_of(ids, num_shards)],
            "family": [_family(r.raw_json) for r in records],
            "raw_json": [r.raw_json for r in records],
        },
        schema_overrides={"image": pl.String, "image_bytes": pl.Int64, "family": pl.String},
    )


def _family(raw_json: str) -> str | None:
    """The optional ``family`` label (the demo's task family); parsed only where present."""
    if '"family"' not in raw_json:
        return None
    value = json.loads(raw_json).get("family")
    return value if isinstance(value, str) else None


def record_labels(manifest: pl.DataFrame) -> dict[str, list]:
    """Each row's analysis labels, None where a record has none: ``family`` (the demo's task
    family, a manifest column), ``source`` and ``wrong`` (the mix world's record fields). The
    selection never reads them; the evaluation reports subsets by them."""
    family = manifest["family"].to_list() if "family" in manifest.columns else [None] * manifest.height
    raws = manifest["raw_json"].to_list()
    return {"family": family, "source": [_field(raw, "source", str) for raw in raws], "wrong": [_field(raw, "wrong", bool) for raw in raws]}


def _field(raw_json: str, key: str, kind: type) -> object | None:
    if f'"{key}"' not in raw_json:  # parsed only where present
        return None
    value = json.loads(raw_json).get(key)
    return value if isinstance(value, kind) else None


def records_from_manifest(manifest: pl.DataFrame, image_root: Path | None) -> list[Record]:
    """Rebuild records (turns from the untouched JSON) for the rows of a manifest, their images
    resolved under ``image_root`` (the configured one: the data may have moved since the pool
    was read). An image that escapes the root, is missing or has another size than when the
    pool was validated is an error naming the record: the root names other data."""
    if "image_bytes" not in manifest.columns:
        raise ValueError("training_pool's manifest predates image paths relative to the image root: materialize training_pool again")
    root = ImageRoot(image_root) if image_root is not None else None
    records = []
    for row in manifest.iter_rows(named=True):
        raw = json.loads(row["raw_json"])
        turns = tuple(Turn(t["from"], t["value"]) for t in raw["conversations"])
        subtask = raw.get("subtask")
        records.append(
            Record(
                id=row["id"],
                image=row["image"],
                image_path=_locate(root, row) if row["image"] is not None else None,
                turns=turns,
                subtask=subtask if isinstance(subtask, str) and subtask else None,
                raw_json=row["raw_json"],
                index=row["index"],
            )
        )
    return records


def _locate(root: ImageRoot | None, row: dict) -> Path:
    where = f"pool record {row['id']!r} (#{row['index']})"
    if root is None:
        raise ValueError(f"{where}: has image {row['image']!r} but no image root is configured (data.image_root)")
    try:
        path = root.locate(row["image"])
    except ValueError as error:
        raise ValueError(f"{where}: {error} (data.image_root {root.path} must hold the images the pool was validated with)") from None
    size = path.stat().st_size
    if size != row["image_bytes"]:
        raise ValueError(
            f"{where}: image {path} has {size} bytes, {row['image_bytes']} when the pool was validated: "
            f"data.image_root {root.path} holds other images (materialize training_pool again if they changed)"
        )
    return path
