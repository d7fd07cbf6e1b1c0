"""The store shared through an fsspec URL: what one machine writes, another reuses.

``memory://`` and ``file://`` stand in for s3:// or gs:// (same fsspec calls)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from icons_dagster.core.stages.icons import INFLUENCE_FILE
from icons_dagster.demo.data import BENCHMARK_NAMES
from icons_dagster.core.stages.kit import Stage
from icons_dagster.core.storage.artifacts import COMPLETE_MARKER, CORRUPT_MARKER, ArtifactStore, CorruptArtifact, RemoteStore, save_npy
from icons_dagster.core.storage.npy import stream_rows
from icons_dagster.runner import run_graph
from graph_helpers import demo_config, latest_metadata, sha, temp_instance


def _write(store: ArtifactStore, directory, payload: bytes) -> None:
    with store.writing(directory, {"ref": {"n": 3}}) as tmp:
        (tmp / "part").mkdir()
        (tmp / "part" / "data.bin").write_bytes(payload)
        save_npy(tmp / "features.npy", np.arange(6, dtype=np.float16).reshape(2, 3))


@pytest.fixture
def remote_url():
    return f"memory://icons-test-{uuid.uuid4().hex[:8]}"


def test_an_artifact_written_on_one_machine_is_pulled_on_another(tmp_path, remote_url):
    first = ArtifactStore(tmp_path / "a", remote_url)
    directory = first.artifact_dir("training_gradients", "f00d", "shard-0000")
    _write(first, directory, b"abc")
    remote = RemoteStore(remote_url)
    assert remote.has_file(f"artifacts/training_gradients/f00d/shard-0000/{COMPLETE_MARKER}")
    second = ArtifactStore(tmp_path / "b", remote_url)
    there = second.artifact_dir("training_gradients", "f00d", "shard-0000")
    assert not there.exists()
    assert second.is_complete(there)  # pulled
    assert (there / "part" / "data.bin").read_bytes() == b"abc"
    assert sha(there / "features.npy") == sha(directory / "features.npy")
    assert second.read_manifest(there)["ref"] == {"n": 3}
    # absolute() of a reference pulls too
    third = ArtifactStore(tmp_path / "c", remote_url)
    assert (third.absolute("artifacts/training_gradients/f00d/shard-0000") / "part" / "data.bin").read_bytes() == b"abc"
    assert not list((tmp_path / "b").rglob(".tmp-*"))


def test_a_half_uploaded_folder_is_never_trusted(tmp_path, remote_url):
    remote = RemoteStore(remote_url)
    remote.write_text("artifacts/s/beef/features.npy", "partial")  # files, but no manifest
    store = ArtifactStore(tmp_path / "b", remote_url)
    directory = store.artifact_dir("s", "beef")
    assert not store.is_complete(directory)
    assert not directory.exists()


def test_a_local_only_artifact_is_uploaded_when_next_asked_for(tmp_path, remote_url):
    local = ArtifactStore(tmp_path / "a")  # e.g. committed here, then the run died before uploading
    directory = local.artifact_dir("s", "cafe")
    _write(local, directory, b"xyz")
    shared = ArtifactStore(tmp_path / "a", remote_url)
    assert shared.is_complete(directory)
    assert RemoteStore(remote_url).has_file(f"artifacts/s/cafe/{COMPLETE_MARKER}")
    elsewhere = ArtifactStore(tmp_path / "b", remote_url)
    assert (elsewhere.absolute("artifacts/s/cafe") / "part" / "data.bin").read_bytes() == b"xyz"


def _features_stage(store: ArtifactStore):
    """A stage whose artifact is a feature file and a small table, reused when committed."""
    stage = Stage(store, "training_gradients", "shard-0000", seed=3)
    if (done := stage.reused()) is not None:
        return stage, done
    with stage.building({"seed": 3}) as out:
        save_npy(out.folder / "features-checkpoint-0.npy", np.arange(3000, dtype=np.float16).reshape(300, 10))
        (out.folder / "table.json").write_text('{"rows": 300}', encoding="utf-8")
        out.ref = {"n_samples": 300, "shard": "shard-0000"}
    return stage, stage.result()


def _streamed(store: ArtifactStore, relative: str) -> int:
    """Stream the feature file where it is and check it against its manifest; its row count."""
    stored = store.stored(relative)
    digests = []
    rows = sum(len(chunk) for _, chunk in stream_rows([stored.file("features-checkpoint-0.npy")], 64, digests=digests))
    stored.check("features-checkpoint-0.npy", digests[0].file_bytes, digests[0].sha256)
    return rows


def test_a_remote_only_artifact_is_reused_and_streamed_without_a_local_copy_and_a_corrupt_one_recomputed(tmp_path, remote_url):
    _, first = _features_stage(ArtifactStore(tmp_path / "a", remote_url))
    original = (tmp_path / "a" / first.ref.path / "features-checkpoint-0.npy").read_bytes()
    second = ArtifactStore(tmp_path / "b", remote_url)
    _, reused = _features_stage(second)
    url = f"{remote_url}/{first.ref.path}"
    assert reused.metadata["reused"] and reused.directory is None and reused.metadata["remote_location"] == url
    assert reused.ref.n_samples == 300
    assert _streamed(second, reused.ref.path) == 300
    assert second.stored(reused.ref.path).read_bytes("table.json") == b'{"rows": 300}'
    assert not (tmp_path / "b" / "artifacts").exists()  # nothing was copied here
    # one flipped byte on the remote: the read finds it, names the URL and withdraws the copy
    remote = RemoteStore(remote_url)
    damaged = bytearray(original)
    damaged[-3] ^= 0x04
    remote.fs.pipe_file(remote._path(f"{first.ref.path}/features-checkpoint-0.npy"), bytes(damaged))
    with pytest.raises(CorruptArtifact, match=f"artifact {url} is corrupt: features-checkpoint-0.npy: sha256 differs"):
        _streamed(second, reused.ref.path)
    assert not remote.has_file(f"{first.ref.path}/{COMPLETE_MARKER}") and remote.has_file(f"{first.ref.path}/{CORRUPT_MARKER}")
    # so the stage recomputes it, says why, and the shared copy is whole again
    _, rebuilt = _features_stage(second)
    assert not rebuilt.metadata["reused"] and rebuilt.metadata["replaced_corrupt_copy"].startswith("features-checkpoint-0.npy: sha256 differs")
    assert remote.has_file(f"{first.ref.path}/{COMPLETE_MARKER}") and not remote.has_file(f"{first.ref.path}/{CORRUPT_MARKER}")
    assert remote.read_bytes(f"{first.ref.path}/features-checkpoint-0.npy") == original
    assert _streamed(ArtifactStore(tmp_path / "c", remote_url), first.ref.path) == 300


def test_a_second_machine_reuses_the_whole_graph_from_a_file_url(demo_paths, tiny_model_dir, tmp_path, capsys):
    shared = (tmp_path / "shared").as_uri()  # file:///...
    config = demo_config(demo_paths, demo_paths.benchmarks, store={"remote": shared})
    assert config.model.name_or_path == str(tiny_model_dir)  # one checkpoint both machines name alike
    first_home, second_home = tmp_path / "one", tmp_path / "two"
    run_graph(first_home, config, instance=temp_instance(first_home))
    second_instance = temp_instance(second_home)
    second = run_graph(second_home, config, instance=second_instance)
    # the second machine computed nothing: every artifact came from the shared store
    for asset in ("training_pool", "warmup_checkpoint", "vote_table", "selected_subset"):
        assert ArtifactStore(second_home).read_ref(asset).reused, asset
    assert ArtifactStore(second_home).read_ref("training_gradients", "shard-0000").reused
    assert sha(second["subset_json"]) == sha(first_home / "exports" / "selected_subset.json")
    # the training features were reused where they are: never copied to the second machine;
    # the UI still shows their table's rows and columns (its footer, read from the store)
    assert not (second_home / "artifacts" / "training_gradients").exists()
    shard_meta = latest_metadata(second_instance, "training_gradients", "shard-0000")
    assert shard_meta["path"].startswith(shared + "/artifacts/training_gradients/")
    assert shard_meta["dagster/row_count"] == ArtifactStore(first_home).read_ref("training_gradients", "shard-0000").n_samples > 0
    # a new vote threshold there: the influence is recomputed, streaming the shared shards
    run_graph(second_home, config.replace(selection={"p": 0.3}), instance=temp_instance(second_home))
    assert not (second_home / "artifacts" / "training_gradients").exists()
    for benchmark in BENCHMARK_NAMES:
        ours, theirs = (ArtifactStore(home).read_ref("task_influence", benchmark) for home in (second_home, first_home))
        assert not ours.reused and ours.fingerprint != theirs.fingerprint
        columns = [pl.read_parquet(ArtifactStore(home).absolute(ref.path) / INFLUENCE_FILE) for home, ref in ((second_home, ours), (first_home, theirs))]
        assert columns[0].equals(columns[1])
    # a third machine that shares only the store (no run, no local reference) explains a sample
    from icons_dagster.cli import main
    from icons_dagster.resources.home import write_home_config

    third_home = tmp_path / "three"
    write_home_config(third_home, config)
    selected = json.loads((first_home / "exports" / "selected_subset.json").read_text())[0]["id"]
    assert not (third_home / "refs").exists()
    assert main(["--home", str(third_home), "explain", selected]) == 0
    assert f"**{selected}**: selected" in capsys.readouterr().out


def test_an_export_is_copied_from_the_shared_store_and_checked_from_the_bytes_it_copies(tmp_path, remote_url):
    from icons_dagster.core.stages.icons import SUBSET_JSON, SUBSET_PARQUET, export_subset

    first = ArtifactStore(tmp_path / "a", remote_url)
    directory = first.artifact_dir("selected_subset", "5eed")
    with first.writing(directory, {}) as tmp:
        (tmp / SUBSET_JSON).write_bytes(b'[{"id": "r1"}]\n')
        (tmp / SUBSET_PARQUET).write_bytes(b"PAR1 stand-in")
    relative = first.relative(directory)
    second = ArtifactStore(tmp_path / "b", remote_url)
    paths = export_subset(second, second.stored(relative))
    assert Path(paths["json"]).read_bytes() == b'[{"id": "r1"}]\n' and Path(paths["parquet"]).read_bytes() == b"PAR1 stand-in"
    assert not (tmp_path / "b" / "artifacts").exists()  # copied from the store, not pulled
    remote = RemoteStore(remote_url)
    remote.fs.pipe_file(remote._path(f"{relative}/{SUBSET_JSON}"), b'[{"id": "r2"}]\n')  # same size, other bytes
    with pytest.raises(CorruptArtifact, match=f"artifact {remote_url}/{relative} is corrupt: {SUBSET_JSON}: sha256 differs"):
        export_subset(second, second.stored(relative))
    assert Path(paths["json"]).read_bytes() == b'[{"id": "r1"}]\n'  # the last good export stays
    assert sorted(p.name for p in second.exports_dir.iterdir()) == sorted([SUBSET_JSON, SUBSET_PARQUET])  # no temporary left
