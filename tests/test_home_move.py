"""A copied or moved home and data folder keep every artifact: fingerprints take data by content."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import polars as pl
import pytest
from dagster import AssetKey

from icons_dagster.assets import ICONS_ASSETS
from icons_dagster.core.data import image_hashes
from icons_dagster.core.data.benchmarks import load_benchmark
from icons_dagster.core.data.image_hashes import ImageHashCache, images_key
from icons_dagster.core.data.pool import MANIFEST_FILE, records_from_manifest
from icons_dagster.core.data.records import load_records
from icons_dagster.core.stages.icons import stage_pool
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.runner import run_graph
from graph_helpers import demo_config, latest_metadata, sha, temp_instance

BENCHMARK = "yes_no"
ICONS_ASSET_NAMES = [a.key.to_user_string() for a in ICONS_ASSETS]


def copy_data(demo_paths, folder: Path, benchmarks: tuple[str, ...] = (BENCHMARK,)) -> Path:
    """The pool, its images and some benchmarks (with their own images) under ``folder``."""
    shutil.copytree(demo_paths.image_root, folder / "images")
    shutil.copy2(demo_paths.pool, folder / "pool.json")
    for name in benchmarks:
        shutil.copytree(demo_paths.benchmarks / name, folder / "benchmarks" / name)
    return folder


def config_for(demo_paths, data: Path):
    return demo_config(demo_paths, data / "benchmarks", data={"pool": str(data / "pool.json"), "image_root": str(data / "images")})


def latest_per_partition(instance, name: str) -> dict[str | None, dict]:
    """The newest materialization's metadata of each partition (None: unpartitioned)."""
    records = instance.fetch_materializations(AssetKey(name), limit=1000).records  # newest first
    latest: dict[str | None, dict] = {}
    for record in records:
        partition = record.event_log_entry.dagster_event.partition
        if partition not in latest:
            latest[partition] = {k: v.value for k, v in record.asset_materialization.metadata.items()}
    return latest


def test_a_copied_home_and_data_reuse_every_icons_artifact(demo_paths, tmp_path):
    data_a, home_a = copy_data(demo_paths, tmp_path / "data-a"), tmp_path / "home-a"
    first = run_graph(home_a, config_for(demo_paths, data_a), instance=temp_instance(home_a))

    data_b, home_b = tmp_path / "mnt" / "data-b", tmp_path / "elsewhere" / "home-b"
    shutil.copytree(data_a, data_b)
    shutil.copytree(home_a, home_b)
    shutil.rmtree(data_a)  # nothing may read the old location
    artifacts = home_b / "artifacts"
    before = {p: p.stat().st_mtime_ns for p in artifacts.rglob("*") if p.is_file()}
    instance = temp_instance(home_b)
    second = run_graph(home_b, config_for(demo_paths, data_b), instance=instance)

    assert {p: p.stat().st_mtime_ns for p in artifacts.rglob("*") if p.is_file()} == before  # nothing recomputed
    for name in ICONS_ASSET_NAMES:
        latest = latest_per_partition(instance, name)
        assert latest, name
        for partition, metadata in latest.items():
            assert metadata["reused"] is True, (name, partition)
            assert Path(metadata["path"]).is_relative_to(home_b) and Path(metadata["path"]).is_dir(), (name, partition)
    for kind in ("subset_json", "subset_parquet"):
        assert sha(second[kind]) == sha(first[kind])
    subset_meta = latest_metadata(instance, "selected_subset")
    assert subset_meta["export_json"] == str(home_b.resolve() / "exports" / "selected_subset.json")
    pool_meta = latest_metadata(instance, "training_pool")
    assert pool_meta["source"] == str(data_b / "pool.json") and pool_meta["image_root"] == str(data_b / "images")

    # what later stages read resolves under the image root configured now, never the old one
    store = ArtifactStore(home_b)
    manifest = pl.read_parquet(store.absolute(store.read_ref("training_pool").path) / MANIFEST_FILE)
    records = records_from_manifest(manifest, data_b / "images")
    with_images = [r for r in records if r.image_path is not None]
    assert with_images and all(r.image_path.is_relative_to(data_b / "images") and r.image_path.is_file() for r in with_images)
    with pytest.raises(ValueError, match=r"pool record '.+' \(#\d+\): image file not found: .*data-a.*data\.image_root"):
        records_from_manifest(manifest, data_a / "images")
    # the exported subset keeps LLaVA's relative image field, as the input wrote it
    pool = {r["id"]: r for r in json.loads((data_b / "pool.json").read_text())}
    assert all(r == pool[r["id"]] for r in json.loads(Path(second["subset_json"]).read_text()))


def test_changed_image_bytes_change_the_pool_and_benchmark_fingerprints(demo_paths, tmp_path):
    from PIL import Image

    data = copy_data(demo_paths, tmp_path / "data")
    store = ArtifactStore(tmp_path / "home")
    built = stage_pool(store, data / "pool.json", data / "images", 2)
    again = stage_pool(store, data / "pool.json", data / "images", 2)
    assert again.ref.reused and again.ref.fingerprint == built.ref.fingerprint

    cache = ImageHashCache(store.image_hash_cache)
    benchmark = load_benchmark(data / "benchmarks", BENCHMARK, data / "images")
    benchmark_key = images_key(benchmark, cache.contents(benchmark.records))
    for image in (
        data / "images" / next(r["image"] for r in json.loads((data / "pool.json").read_text()) if r.get("image")),
        next(r.image_path for r in benchmark.records if r.image_path is not None),
    ):
        with Image.open(image) as img:
            changed = img.convert("RGB")
        changed.putpixel((0, 0), tuple(255 - c for c in changed.getpixel((0, 0))))
        changed.save(image)

    rebuilt = stage_pool(store, data / "pool.json", data / "images", 2)
    assert not rebuilt.ref.reused and rebuilt.ref.fingerprint != built.ref.fingerprint
    assert rebuilt.metadata["images_sha256"] != built.metadata["images_sha256"]
    assert rebuilt.metadata["content_sha256"] == built.metadata["content_sha256"]  # the records did not change
    benchmark = load_benchmark(data / "benchmarks", BENCHMARK, data / "images")
    assert images_key(benchmark, cache.contents(benchmark.records)) != benchmark_key


def test_an_image_that_appears_changes_the_key_and_text_only_records_have_none(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    records = [
        {"id": "t", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "i", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]},
    ]
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(records))
    cache = ImageHashCache(None)
    missing = load_records(pool, tmp_path / "images")
    assert [p.index for p in missing.problems] == [1]
    Image.new("RGB", (4, 4), "red").save(tmp_path / "images" / "a.png")
    present = load_records(pool, tmp_path / "images")
    assert images_key(missing, cache.contents(missing.records)) != images_key(present, cache.contents(present.records))


def test_the_content_cache_follows_size_and_mtime(tmp_path, monkeypatch):
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    image.write_bytes(b"first image bytes")
    past = 1_600_000_000_000_000_000
    os.utime(image, ns=(past, past))
    records = load_records(_one_record_pool(tmp_path), tmp_path / "images").records
    cache = ImageHashCache(tmp_path / "home" / "cache.sqlite")
    reads: list[Path] = []
    hash_file = image_hashes._sha256
    monkeypatch.setattr(image_hashes, "_sha256", lambda path: reads.append(path) or hash_file(path))

    first = cache.contents(records)[image.resolve()]
    assert reads == [image.resolve()] and first.size == len(b"first image bytes")
    assert cache.contents(records)[image.resolve()] == first and len(reads) == 1  # a rerun reads no image

    image.write_bytes(b"other image bytes")  # same size, same mtime: the cache cannot tell (what it keys on)
    os.utime(image, ns=(past, past))
    assert cache.contents(records)[image.resolve()] == first and len(reads) == 1
    os.utime(image, ns=(past, past + 1))  # another mtime: read again
    second = cache.contents(records)[image.resolve()]
    assert len(reads) == 2 and second.sha256 != first.sha256
    image.write_bytes(b"a longer other image")  # another size, the cached mtime: read again
    os.utime(image, ns=(past, past + 1))
    third = cache.contents(records)[image.resolve()]
    assert len(reads) == 3 and third.size == len(b"a longer other image") and third.sha256 != second.sha256

    image.write_bytes(b"just written")  # modified now: hashed, but not kept (a same-tick rewrite would go unseen)
    cache.contents(records)
    with sqlite3.connect(cache.file) as connection:
        rows = connection.execute("SELECT path, size FROM image_sha256").fetchall()
    assert rows == [(str(image.resolve()), len(b"a longer other image"))]
    cache.contents(records)
    assert len(reads) == 5


def _one_record_pool(folder: Path) -> Path:
    pool = folder / "pool.json"
    record = {"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]}
    pool.write_text(json.dumps([record]))
    return pool


def test_many_images_each_get_their_own_size_and_hash(tmp_path):
    """Past one stat batch and one lookup chunk (stat-ed in batches on threads, looked up in
    chunks): each path keeps its own size and sha256, on the first pass and from the cache."""
    import hashlib

    root = tmp_path / "images"
    root.mkdir()
    entries, expected = [], {}
    past = 1_600_000_000_000_000_000
    for k in range(1000):
        data = b"x" * (k % 7) + str(k).encode()
        (root / f"{k:04d}.png").write_bytes(data)
        os.utime(root / f"{k:04d}.png", ns=(past, past))
        expected[(root / f"{k:04d}.png").resolve()] = (len(data), hashlib.sha256(data).hexdigest())
        entries.append({"id": f"r{k}", "image": f"{k:04d}.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]})
    (tmp_path / "pool.json").write_text(json.dumps(entries))
    records = load_records(tmp_path / "pool.json", root).records
    cache = ImageHashCache(tmp_path / "cache.sqlite", workers=3)
    for _ in range(2):  # hashed, then from the cache
        assert {path: (c.size, c.sha256) for path, c in cache.contents(records).items()} == expected
