"""Stage-1 alignment data and pre-training of the tiny LLaVA (core/model/alignment.py, demo/stage1.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from icons_dagster.core.data.records import load_records
from icons_dagster.core.model.alignment import AlignmentRecipe, answer_loss, train_alignment
from icons_dagster.demo.data import generate_alignment_data, generate_demo
from icons_dagster.demo.stage1 import STAGE1_DIR, STAGE1_FILE, alignment_records, ensure_stage1_model

# sha256 of pool.json and of the benchmark split files of generate_demo(size="test", seed=0),
# recorded before the alignment generator was added to demo/data.py: they guard that it does
# not perturb the pool's or the benchmarks' random streams (the texts; the images are drawn
# from the same streams, so a perturbation would show here too).
POOL_SHA256 = "f54dd9f6fe3022a11ab7bc28d2b223605e4e4efc71759a55a3d9269dc03eab16"
BENCHMARK_JSON_SHA256 = "38291f5c5737bd7b92d2a42773d9b17cb12e7cb38a2dba8fe01c1a186d3bd6f5"

THREADS = 1  # byte-identical weights need the same thread count (and 1 is the fast one here)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def align_dir(tmp_path_factory) -> Path:
    return generate_alignment_data(tmp_path_factory.mktemp("align") / "train", 96)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    return alignment_records(generate_alignment_data(tmp_path_factory.mktemp("align") / "heldout", 48, seed=2000))


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory, tiny_model_dir, align_dir):
    """The same short training twice: one checkpoint to inspect, one to compare bytes with."""
    records = alignment_records(align_dir)
    root = tmp_path_factory.mktemp("stage1")
    seen: list[tuple[int, int, float]] = []
    recipe = AlignmentRecipe(steps=30, batch_size=8, num_threads=THREADS)
    info = train_alignment(tiny_model_dir, records, root / "a", recipe, progress=lambda *a: seen.append(a))
    train_alignment(tiny_model_dir, records, root / "b", recipe)
    return root / "a", root / "b", seen, info


# --------------------------------------------------------------------------- data


def test_demo_pool_and_benchmarks_unchanged(tmp_path):
    paths = generate_demo(tmp_path / "demo", size="test")
    assert hashlib.sha256(paths.pool.read_bytes()).hexdigest() == POOL_SHA256
    combined = hashlib.sha256()
    for f in sorted(paths.benchmarks.rglob("*.json")):
        combined.update(str(f.relative_to(paths.root)).encode())
        combined.update(hashlib.sha256(f.read_bytes()).digest())
    assert combined.hexdigest() == BENCHMARK_JSON_SHA256


def test_alignment_data_deterministic_and_idempotent(tmp_path, align_dir):
    again = generate_alignment_data(tmp_path / "again", 96)
    assert _tree_hashes(again) == _tree_hashes(align_dir)
    stamp = (again / "align.json").stat().st_mtime_ns
    assert generate_alignment_data(tmp_path / "again", 96) == again
    assert (again / "align.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    other = generate_alignment_data(tmp_path / "other", 96, seed=7)
    assert (other / "align.json").read_bytes() != (again / "align.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_alignment_data_loads_and_is_disjoint_from_demo(align_dir, demo_paths):
    loaded = load_records(align_dir / "align.json", align_dir / "images")
    assert not loaded.problems and len(loaded.records) == 96
    raw = json.loads((align_dir / "align.json").read_text(encoding="utf-8"))
    assert {r["kind"] for r in raw} == {"scene", "photo", "text", "digit"}
    for r in raw:
        human, gpt = (t["value"] for t in r["conversations"])
        assert human.count("<image>") == 1 and gpt.startswith(("The image shows", "This is a"))

    demo_ids = {r["id"] for r in json.loads(demo_paths.pool.read_text(encoding="utf-8"))}
    assert not demo_ids & {r.id for r in loaded.records}
    demo_images = {hashlib.sha256(p.read_bytes()).digest() for p in demo_paths.root.rglob("*.png")}
    align_images = [hashlib.sha256(p.read_bytes()).digest() for p in (align_dir / "images").rglob("*.png")]
    assert len(align_images) == 96 and len(set(align_images)) == 96
    assert not demo_images & set(align_images)


# --------------------------------------------------------------------------- training


def test_train_stage1_lowers_heldout_loss(stage1_runs, tiny_model_dir, heldout):
    first, _, seen, info = stage1_runs
    before = answer_loss(tiny_model_dir, heldout, num_threads=THREADS)
    after = answer_loss(first, heldout, num_threads=THREADS)
    assert after < 0.8 * before, (before, after)
    assert info["n_records"] == 96 and info["n_encoded"] == 96 and info["epochs_started"] == 3
    assert info["final_window_loss"] < info["loss_curve"][0]["loss"]
    assert [p["step"] for p in info["loss_curve"]] == [10, 20, 30]
    assert [s for s, _, _ in seen] == list(range(1, 31))


def test_train_stage1_freezes_vision_and_trains_the_rest(stage1_runs, tiny_model_dir):
    first, _, _, info = stage1_runs
    assert info["trained"] == ["model.multi_modal_projector", "model.language_model", "lm_head"] and info["frozen"] == ["model.vision_tower"]
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(first / "model.safetensors"))
    assert base.keys() == trained.keys()
    vision = [k for k in base if "vision_tower" in k]
    assert vision and all(base[k].equal(trained[k]) for k in vision)
    for prefix in ("language_model.", "multi_modal_projector."):  # the checkpoint's (legacy) key layout
        names = [k for k in base if k.startswith(prefix) and k.endswith("weight")]
        assert names and all(not base[k].equal(trained[k]) for k in names), prefix


def test_train_stage1_is_deterministic_and_reloads(stage1_runs):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    first, second, _, _ = stage1_runs
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    model = AutoModelForImageTextToText.from_pretrained(str(first))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert AutoProcessor.from_pretrained(str(first)).tokenizer.pad_token_id is not None


def test_ensure_stage1_model_reuses_a_complete_build(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / tiny_model_dir.name)  # same manifest: reused, not rebuilt
    out = ensure_stage1_model(tmp_path, steps=2, n_records=24, heldout=8)
    assert out == tmp_path / STAGE1_DIR
    info = json.loads((out / STAGE1_FILE).read_text(encoding="utf-8"))
    assert info["recipe"]["steps"] == 2 and info["key"] and info["heldout"]["n_records"] == 8
    assert info["n_records"] == 24 and info["recipe"]["num_threads"] == 1
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert ensure_stage1_model(tmp_path, steps=2, n_records=24, heldout=8) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    ensure_stage1_model(tmp_path, steps=3, n_records=24, heldout=0)  # another recipe: rebuilt in place
    assert json.loads((out / STAGE1_FILE).read_text(encoding="utf-8"))["recipe"]["steps"] == 3
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
