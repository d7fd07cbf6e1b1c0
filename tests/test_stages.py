"""The stages without Dagster: several checkpoints, Adam features, the store's crash safety."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import polars as pl
import pytest

from icons_dagster.core.config import GradientConfig, LoraSettings, ModelConfig, SelectionConfig, WarmupConfig
from icons_dagster.core.features.extraction import load_features, load_samples
from icons_dagster.core.stages import icons as pipeline
from icons_dagster.core.stages.icons import (
    ModelCache,
    stage_influences,
    stage_pool,
    stage_selected_subset,
    stage_train_shard,
    stage_validation,
    stage_vote_table,
    stage_warmup_checkpoint,
    stage_warmup_subset,
)
from icons_dagster.core.storage.artifacts import ArtifactStore, clean_leftovers, temporary_sibling
from icons_dagster.core.model.training import checkpoint_weights


@pytest.fixture(scope="module")
def two_checkpoint_run(demo_paths, tiny_model_dir, tmp_path_factory):
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    models = ModelCache()
    model = ModelConfig(str(tiny_model_dir), max_length=512)
    pool = stage_pool(store, demo_paths.pool, demo_paths.image_root, num_shards=2).ref
    warmup = WarmupConfig(ratio=0.25, epochs=2, num_checkpoints=2, learning_rate=1e-3)
    subset = stage_warmup_subset(store, pool, warmup).ref
    ckpt = stage_warmup_checkpoint(store, pool, subset, model, LoraSettings(r=4, alpha=8), warmup, models, image_root=demo_paths.image_root).ref
    return store, models, model, pool, ckpt


def test_checkpoints_carry_lr_weights(two_checkpoint_run):
    store, _, _, _, ckpt = two_checkpoint_run
    entries = ckpt.checkpoints
    assert [e["index"] for e in entries] == [0, 1]
    lrs = [e["mean_learning_rate"] for e in entries]
    assert lrs[0] > lrs[1] > 0  # cosine decay: the second epoch's mean LR is lower
    assert [e["weight"] for e in entries] == pytest.approx(checkpoint_weights(lrs))
    assert sum(e["weight"] for e in entries) == pytest.approx(1.0)
    for e in entries:
        folder = store.absolute(ckpt.path) / e["dir"]
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
        assert (folder / "adam_moments.safetensors").is_file()


def test_influence_sums_checkpoints_by_lr_weight_with_adam_features(two_checkpoint_run, demo_paths):
    store, models, model, pool, ckpt = two_checkpoint_run
    adam = GradientConfig(dim=128, seed=5, train_gradient="adam", batch_size=8)
    sgd = GradientConfig(dim=128, seed=5, train_gradient="sgd", batch_size=8)
    shards = {s: stage_train_shard(store, s, pool, ckpt, model, adam, models, image_root=demo_paths.image_root).ref for s in ("shard-0000", "shard-0001")}
    sgd_shard = stage_train_shard(store, "shard-0000", pool, ckpt, model, sgd, models, image_root=demo_paths.image_root).ref
    assert sgd_shard.path != shards["shard-0000"].path
    adam_features = load_features(store.absolute(shards["shard-0000"].path), 1, mmap=False).astype(np.float32)
    sgd_features = load_features(store.absolute(sgd_shard.path), 1, mmap=False).astype(np.float32)
    assert adam_features.shape == sgd_features.shape
    assert not np.allclose(adam_features, sgd_features, atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(adam_features, axis=1), 1.0, atol=2e-3)

    val = stage_validation(store, "yes_no", demo_paths.benchmarks, demo_paths.image_root, ckpt, model, sgd, models).ref
    influence = stage_influences(store, pool, ckpt, shards, {"yes_no": val}, p=0.2, write_full_matrix=True)["yes_no"].ref
    frame = pl.read_parquet(store.absolute(influence.path) / "influence.parquet")
    # The full matrix, on request, agrees with the streamed means (eq. 3).
    matrix = np.load(store.absolute(influence.path) / "influence_matrix-checkpoint-1.npy", allow_pickle=False)
    assert matrix.shape[0] == frame.height
    np.testing.assert_allclose(matrix.mean(axis=1), frame["influence_checkpoint_1"].to_numpy(), rtol=1e-4, atol=1e-5)
    weights = [e["weight"] for e in ckpt.checkpoints]
    expected = weights[0] * frame["influence_checkpoint_0"].to_numpy() + weights[1] * frame["influence_checkpoint_1"].to_numpy()
    np.testing.assert_allclose(frame["influence"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    # eq. 3 by brute force for checkpoint 0: mean over validation rows of the cosine.
    val_dir = store.absolute(val.path)
    v = load_features(val_dir, 0, mmap=False).astype(np.float32)
    t = load_features(store.absolute(shards["shard-0000"].path), 0, mmap=False).astype(np.float32)
    n0 = len(load_samples(store.absolute(shards["shard-0000"].path)))
    np.testing.assert_allclose(frame["influence_checkpoint_0"].to_numpy()[:n0], (t @ v.T).mean(axis=1), rtol=1e-4, atol=1e-5)
    # Every pool record is scored exactly once across shards.
    assert sorted(frame["id"].to_list()) == sorted(r["id"] for r in json.loads(demo_paths.pool.read_text()))

    votes = stage_vote_table(store, {"yes_no": influence}, SelectionConfig(p=0.2)).ref
    result = stage_selected_subset(store, pool, votes, SelectionConfig(p=0.2))
    assert result.ref.n_selected == int(0.2 * frame.height)
    # the default coverage reserve (0.5) of one benchmark is its own top half of the cut,
    # which its vote keeps anyway: the reserve adds nothing with a single benchmark
    metadata = result.metadata
    assert metadata["coverage"] == 0.5
    assert metadata["n_reserved"] == int(0.5 * int(0.2 * frame.height)) and metadata["n_by_coverage"] == 0


def test_benchmarks_scored_in_one_pass_equal_each_scored_alone(two_checkpoint_run, demo_paths, monkeypatch):
    """K benchmarks read the training features once per checkpoint, not K times, and each
    gets the artifact it would get alone (same fingerprint, same bits)."""
    store, models, model, pool, ckpt = two_checkpoint_run
    sgd = GradientConfig(dim=64, seed=3, batch_size=8)
    shards = {s: stage_train_shard(store, s, pool, ckpt, model, sgd, models, image_root=demo_paths.image_root).ref for s in ("shard-0000", "shard-0001")}
    names = ("counting", "multiple_choice", "yes_no")  # multiple_choice: two subtask groups
    vals = {b: stage_validation(store, b, demo_paths.benchmarks, demo_paths.image_root, ckpt, model, sgd, models).ref for b in names}
    passes: list[int] = []
    scores_from_files = pipeline.influence_scores_from_files

    def counted(paths, means, groups=None, **kwargs):
        passes.append(len(groups))  # the real pass, counted, with its subtask groups (one column each)
        return scores_from_files(paths, means, groups, **kwargs)

    monkeypatch.setattr(pipeline, "influence_scores_from_files", counted)
    together = stage_influences(store, pool, ckpt, shards, vals, p=0.2)
    assert sorted(together) == list(names) and passes == [4, 4]  # one pass per checkpoint, all benchmarks' 1 + 2 + 1 groups in it
    frames = {b: pl.read_parquet(store.absolute(r.ref.path) / "influence.parquet") for b, r in together.items()}
    shared = ("compute_seconds", "reused", "scored_together")  # what depends on the pass, not the scores
    metadata = {b: {k: v for k, v in r.metadata.items() if k not in shared} for b, r in together.items()}
    assert metadata["multiple_choice"]["subtask_groups"] == ["color", "shape"]
    assert all(r.metadata["scored_together"] == list(names) for r in together.values())
    # two checkpoints, two subtasks: each subtask's checkpoints are summed first, then the max
    # (LESS's order), by brute force from the stored features
    weights = [e["weight"] for e in ckpt.checkpoints]
    subtasks = load_samples(store.absolute(vals["multiple_choice"].path))["subtask"].to_list()
    per_group = []
    for c in range(2):
        v = load_features(store.absolute(vals["multiple_choice"].path), c, mmap=False).astype(np.float64)
        t = np.concatenate([load_features(store.absolute(shards[s].path), c, mmap=False).astype(np.float64) for s in sorted(shards)])
        per_group.append(np.stack([(t @ v[[x == g for x in subtasks]].T).mean(axis=1) for g in ("color", "shape")], axis=1))
    expected = (weights[0] * per_group[0] + weights[1] * per_group[1]).max(axis=1)
    max_first = weights[0] * per_group[0].max(axis=1) + weights[1] * per_group[1].max(axis=1)
    assert np.abs(max_first - expected).max() > 1e-3  # the two orders differ on this pool, so the check can fail
    np.testing.assert_allclose(frames["multiple_choice"]["influence"].to_numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(frames["multiple_choice"]["influence_checkpoint_1"].to_numpy(), per_group[1].max(axis=1), rtol=1e-4, atol=1e-5)
    for b in names:
        shutil.rmtree(store.absolute(together[b].ref.path))
        passes.clear()
        alone = stage_influences(store, pool, ckpt, shards, {b: vals[b]}, p=0.2)[b]
        assert passes == [max(1, len(metadata[b]["subtask_groups"]))] * 2 and alone.ref.fingerprint == together[b].ref.fingerprint
        assert pl.read_parquet(store.absolute(alone.ref.path) / "influence.parquet").equals(frames[b])
        assert {k: v for k, v in alone.metadata.items() if k not in shared} == metadata[b]
        assert alone.metadata["scored_together"] == [b]
    # stored benchmarks are reused; only the missing one is scored
    shutil.rmtree(store.absolute(together["yes_no"].ref.path))
    passes.clear()
    again = stage_influences(store, pool, ckpt, shards, vals, p=0.2)
    assert passes == [1, 1]  # yes_no: one group
    assert [again[b].ref.reused for b in names] == [True, True, False]


def test_leftovers_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    """What a killed run left (a half-written artifact folder, a pull, a reference's and an
    export's temporary file) goes at the next run's start; a live writer's temporaries, another
    machine's, and every finished artifact stay."""
    import socket
    import subprocess
    import sys

    from dagster import build_init_resource_context

    from icons_dagster.resources import StoreResource

    store = ArtifactStore(tmp_path)
    finished = store.artifact_dir("stage", "abc123", "part")
    with store.writing(finished, {"ok": True}) as tmp:
        (tmp / "data.npy").write_bytes(b"done")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid, live_pid, host = int(dead.stdout), os.getpid(), socket.gethostname()
    fingerprint_dir = finished.parent
    leftovers = [
        fingerprint_dir / f".tmp-part@{host}-{dead_pid}-0123abcd",  # an artifact being written when killed
        fingerprint_dir / f".tmp-pull-part@{host}-{dead_pid}-89abcdef",  # a pull from the shared store
        fingerprint_dir / f".tmp-old-{dead_pid}-0123abcd",  # named before owners carried their host
        tmp_path / "refs" / "stage" / f".part.json@{host}-{dead_pid}.tmp",  # a reference being replaced
        tmp_path / "exports" / f".selected_subset.json@{host}-{dead_pid}.tmp",  # an export being copied
    ]
    kept = [
        fingerprint_dir / f".tmp-part@{host}-{live_pid}-0123abcd",  # a live writer on this machine
        fingerprint_dir / f".tmp-part@elsewhere-{dead_pid}-0123abcd",  # another machine's: not ours to judge
    ]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name.startswith(".tmp-"):
            path.mkdir()
            (path / "data.npy").write_bytes(b"partial")
        else:
            path.write_text("{")
    StoreResource(root=str(tmp_path)).setup_for_execution(build_init_resource_context())  # what each run does first
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in kept) and store.is_complete(finished)
    removed, still = clean_leftovers(tmp_path)
    assert removed == [] and sorted(still) == sorted(kept)
    # the store's own temporaries carry this process as their owner
    assert temporary_sibling(tmp_path / "x.json").name == f".x.json@{host}-{live_pid}.tmp"


def test_store_never_trusts_a_half_written_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    target = store.artifact_dir("stage", "abc123", "part")
    with pytest.raises(RuntimeError):
        with store.writing(target, {"ok": True}) as tmp:
            (tmp / "data.npy").write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert not any(p.name.startswith(".tmp-") for p in target.parent.iterdir())
    # A folder without the completion manifest (e.g. copied by hand) is not complete.
    target.mkdir(parents=True)
    assert not store.is_complete(target)
    with store.writing(target, {"ok": True}) as tmp:
        (tmp / "data.npy").write_bytes(b"whole")
    assert store.is_complete(target) and (target / "data.npy").read_bytes() == b"whole"
    with pytest.raises(ValueError, match="unsafe path component"):
        store.artifact_dir("stage", "abc", "../escape")


def test_an_empty_shard_is_valid_and_scores_nothing(two_checkpoint_run, demo_paths):
    store, models, model, pool, ckpt = two_checkpoint_run
    sgd = GradientConfig(dim=64, seed=0, batch_size=8)
    empty = stage_train_shard(store, "shard-9999", pool, ckpt, model, sgd, models, image_root=demo_paths.image_root)
    assert empty.ref.n_samples == 0
    assert load_features(store.absolute(empty.ref.path), 0, mmap=False).shape == (0, 64)
    full = stage_train_shard(store, "shard-0000", pool, ckpt, model, sgd, models, image_root=demo_paths.image_root).ref
    val = stage_validation(store, "counting", demo_paths.benchmarks, demo_paths.image_root, ckpt, model, sgd, models).ref
    scored = stage_influences(store, pool, ckpt, {"shard-0000": full, "shard-9999": empty.ref}, {"counting": val}, p=0.2)["counting"].ref
    assert scored.n_train == full.n_samples


def test_feature_check_fails_on_a_row_that_is_not_unit_norm_or_a_file_its_manifest_does_not_name(tmp_path):
    from icons_dagster.core.stages.checks import check_features
    from icons_dagster.core.storage.artifacts import save_npy
    from icons_dagster.core.storage.refs import TrainFeaturesRef

    store = ArtifactStore(tmp_path)

    def committed(rows: np.ndarray, fingerprint: str) -> TrainFeaturesRef:
        folder = store.artifact_dir("training_gradients", fingerprint, "shard-0000")
        with store.writing(folder, {}) as tmp:
            save_npy(tmp / "features-checkpoint-0.npy", rows)
        return TrainFeaturesRef(stage="training_gradients", fingerprint=fingerprint, path=store.relative(folder), n_samples=3, shard="shard-0000")

    rows = np.eye(3, 8, dtype=np.float16)
    intact = committed(rows, "unit")
    assert check_features(store, intact, 1) == (True, {"rows": 3, "finite": True, "max_norm_error": 0.0, "tolerance": 2e-3})
    rows[1] *= 2
    passed, metadata = check_features(store, committed(rows, "doubled"), 1)
    assert passed is False and metadata["max_norm_error"] == 1.0 and metadata["rows"] == 3 and "corrupt" not in metadata
    rows[1, 0] = np.nan
    assert check_features(store, committed(rows, "nan"), 1)[1]["finite"] is False
    # found intact once, a file is not hashed again in this process while it stays put
    stored = store.stored(intact.path)
    path = stored.file("features-checkpoint-0.npy")
    assert stored.trusted("features-checkpoint-0.npy")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert not stored.trusted("features-checkpoint-0.npy")
    # unit rows, but not the bytes committed: the same read finds it
    permuted = committed(np.eye(3, 8, dtype=np.float16), "permuted")
    path = store.stored(permuted.path).file("features-checkpoint-0.npy")
    save_npy(path, np.eye(3, 8, dtype=np.float16)[[1, 0, 2]])
    passed, metadata = check_features(store, permuted, 1)
    assert passed is False and metadata["max_norm_error"] == 0.0
    assert metadata["corrupt"].startswith(f"artifact {path.parent} is corrupt: features-checkpoint-0.npy: sha256 differs")


def test_the_model_fingerprint_follows_the_checkpoint_content_not_its_path(tiny_model_dir, tmp_path):
    import shutil

    from icons_dagster.core.model.cache import model_fingerprint_fields

    copy = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(tiny_model_dir, copy)
    here, there = ModelConfig(str(tiny_model_dir)), ModelConfig(str(copy))
    assert model_fingerprint_fields(here) == model_fingerprint_fields(there)  # another mount, same weights
    config = json.loads((copy / "config.json").read_text())
    config["_edited"] = True
    (copy / "config.json").write_text(json.dumps(config))
    assert model_fingerprint_fields(there) != model_fingerprint_fields(here)  # replaced in place: recompute
    hub = model_fingerprint_fields(ModelConfig("org/never-downloaded", revision="v1"))
    assert hub["hub_id"] == "org/never-downloaded" and hub["revision"] == "v1" and hub["commit"] is None


def test_the_new_checks_pass_on_real_artifacts_and_fail_on_damaged_copies(two_checkpoint_run):
    """Pool, checkpoint, influence and subset checks: each passes on what the stages wrote and
    fails on a copy with the one defect it exists to catch."""
    import dataclasses
    import json
    import shutil

    import polars as pl
    from safetensors.torch import load_file, save_file

    from icons_dagster.core.stages.checks import check_checkpoint, check_influence, check_pool, check_subset_records, pool_ids, subset_ids

    store, _, _, pool, ckpt = two_checkpoint_run
    assert check_pool(store, pool)[0] and check_checkpoint(store, ckpt)[0]
    valid = pool_ids(store, pool)

    # a duplicated id, then an unknown shard, in the pool's manifest
    manifest = pl.read_parquet(store.absolute(pool.path) / "manifest.parquet")
    folder = store.root / "damaged_pool"
    folder.mkdir()
    damaged = dataclasses.replace(pool, path=store.relative(folder))
    pl.concat([manifest, manifest.head(1)]).write_parquet(folder / "manifest.parquet")
    assert check_pool(store, dataclasses.replace(damaged, n_records=manifest.height + 1)) == (False, {"n_records": manifest.height + 1, "expected": manifest.height + 1, "unique_ids": False, "unknown_shards": []})
    manifest.with_columns(pl.lit("shard-0009").alias("shard")).write_parquet(folder / "manifest.parquet")
    assert check_pool(store, damaged)[1]["unknown_shards"] == ["shard-0009"]

    # one non-finite LoRA weight
    folder = store.root / "damaged_checkpoint"
    shutil.copytree(store.absolute(ckpt.path), folder)
    (folder / "_COMPLETE.json").unlink()  # its checksums would refuse the damaged copy before the check sees it
    weights = next(folder.rglob("adapter_model.safetensors"))
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, str(weights))
    passed, details = check_checkpoint(store, dataclasses.replace(ckpt, path=store.relative(folder)))
    assert not passed and details["non_finite"] == [f"adapter_model.safetensors:{name}"]

    # influence: a NaN score, then an id the pool rejected
    folder = store.root / "influence"
    folder.mkdir()
    ids = sorted(valid)[:3]
    ref = dataclasses.replace(pool, path=store.relative(folder))
    pl.DataFrame({"id": ids, "influence": [0.1, 0.2, 0.3]}).write_parquet(folder / "influence.parquet")
    assert check_influence(store, ref, valid)[0]
    pl.DataFrame({"id": ids, "influence": [0.1, float("nan"), 0.3]}).write_parquet(folder / "influence.parquet")
    assert check_influence(store, ref, valid)[1]["finite"] is False
    pl.DataFrame({"id": [*ids[:2], "rejected-7"], "influence": [0.1, 0.2, 0.3]}).write_parquet(folder / "influence.parquet")
    assert check_influence(store, ref, valid) == (False, {"rows": 3, "pool_records": len(valid), "finite": True, "not_in_pool": ["rejected-7"]})

    # a subset holding a record the pool stage rejected
    (folder / "selected_subset.json").write_text(json.dumps([{"id": ids[0]}, {"id": "rejected-7"}]))
    assert check_subset_records(subset_ids(store, ref), valid) == (False, {"n_records": 2, "not_in_valid_pool": ["rejected-7"]})
