"""Tests for the offline demo data generator (icons_dagster.demo.data)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from icons_dagster.demo.data import (
    BENCHMARK_NAMES,
    DEMO_SIZES,
    FAMILIES,
    DemoPaths,
    DemoSize,
    demo_corpus,
    generate_demo,
)

SIZE = DEMO_SIZES["test"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    return generate_demo(tmp_path_factory.mktemp("demo") / "out", "test", seed=0)


def _load(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _benchmarks(demo: DemoPaths) -> dict[tuple[str, str], list[dict]]:
    return {(n, s): _load(demo.benchmarks / n / f"{s}.json") for n in BENCHMARK_NAMES for s in ("val", "test")}


def _check_record(rec: dict, image_root: Path, size: int) -> None:
    conv = rec["conversations"]
    assert isinstance(rec["id"], str) and rec["id"]
    assert isinstance(rec["family"], str)
    assert len(conv) >= 2 and len(conv) % 2 == 0
    for i, turn in enumerate(conv):
        assert set(turn) == {"from", "value"}
        assert turn["from"] == ("human" if i % 2 == 0 else "gpt")
        assert isinstance(turn["value"], str) and turn["value"].strip()
    first = conv[0]["value"]
    rest = "".join(t["value"] for t in conv[1:])
    assert "<image>" not in rest
    if "image" in rec:
        assert first.count("<image>") == 1
        assert first.startswith("<image>\n") or first.endswith("\n<image>")
        path = image_root / rec["image"]
        assert path.is_file(), path
        with Image.open(path) as img:
            assert img.mode == "RGB"
            assert img.size == (size, size)
    else:
        assert "<image>" not in first


def test_pool_records_well_formed(demo: DemoPaths) -> None:
    pool = _load(demo.pool)
    ids = [r["id"] for r in pool]
    assert len(ids) == len(set(ids))
    for rec in pool:
        _check_record(rec, demo.image_root, SIZE.image_size)
        assert "subtask" not in rec
        assert re.fullmatch(r"[a-z_]+-\d{6}", rec["id"])
        assert rec["id"].rsplit("-", 1)[0] == rec["family"]
    # every pool image file is referenced exactly once
    referenced = sorted(r["image"] for r in pool if "image" in r)
    on_disk = sorted(str(p.relative_to(demo.image_root)) for p in demo.image_root.rglob("*.png"))
    assert referenced == on_disk


def test_pool_family_counts_and_extras(demo: DemoPaths) -> None:
    pool = _load(demo.pool)
    counts = collections.Counter(r["family"] for r in pool)
    assert counts == {**{f: SIZE.pool_per_family for f in FAMILIES}, "multi_turn": SIZE.multi_turn, "text_only": SIZE.text_only}
    for rec in pool:
        if rec["family"] == "text_only":
            assert "image" not in rec and len(rec["conversations"]) == 2
        else:
            assert "image" in rec
        if rec["family"] == "multi_turn":
            assert len(rec["conversations"]) in (4, 6)
    # the pool is shuffled, not grouped by family
    assert [r["family"] for r in pool] != sorted(r["family"] for r in pool)


def test_noisy_fraction(demo: DemoPaths) -> None:
    pool = _load(demo.pool)
    family_records = [r for r in pool if r["family"] in FAMILIES]
    noisy = [r for r in pool if r.get("noisy")]
    assert all(r["noisy"] is True for r in noisy)
    assert all(r["family"] in FAMILIES for r in noisy)
    assert abs(len(noisy) / len(family_records) - SIZE.noisy_fraction) < 0.01
    # noisy answers keep the family's answer format
    for r in noisy:
        answer = r["conversations"][-1]["value"]
        if r["family"] == "yes_no":
            assert answer in ("Yes", "No")
        if r["family"] == "multiple_choice":
            assert answer in "ABCD" and len(answer) == 1


def test_benchmarks_structure(demo: DemoPaths) -> None:
    assert len(BENCHMARK_NAMES) >= 5
    assert set(BENCHMARK_NAMES) <= set(FAMILIES)
    all_ids: list[str] = []
    for (name, split), recs in _benchmarks(demo).items():
        assert len(recs) == (SIZE.val_per_benchmark if split == "val" else SIZE.test_per_benchmark)
        image_root = demo.benchmarks / name / "images"
        for i, rec in enumerate(recs):
            _check_record(rec, image_root, SIZE.image_size)
            assert rec["id"] == f"bench-{name}-{split}-{i:04d}"
            assert rec["family"] == name
            assert "image" in rec and "noisy" not in rec
            assert len(rec["conversations"]) == 2
            if name == "multiple_choice":
                assert rec["subtask"] in ("color", "shape")
            else:
                assert "subtask" not in rec
        all_ids += [r["id"] for r in recs]
    assert len(all_ids) == len(set(all_ids))


def test_answer_formats_and_balance(demo: DemoPaths) -> None:
    pool = _load(demo.pool)
    by_family = collections.defaultdict(list)
    for r in pool:
        if not r.get("noisy"):
            by_family[r["family"]].append(r)
    answers = {f: [r["conversations"][-1]["value"] for r in recs] for f, recs in by_family.items()}
    # balanced before noise; noisy records (dropped above) can only tip it slightly
    assert abs(answers["yes_no"].count("Yes") - answers["yes_no"].count("No")) <= 2
    assert set(answers["yes_no"]) == {"Yes", "No"}
    letters = collections.Counter(answers["multiple_choice"])
    assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= 2
    for r in by_family["multiple_choice"]:
        assert "\nA. " in r["conversations"][0]["value"] and "\nD. " in r["conversations"][0]["value"]
    assert all(a in ("one", "two", "three", "four") for a in answers["counting"])
    assert all(re.fullmatch(r"[A-Z]+|\d+", a) for a in answers["text_in_image"])
    assert all(2 <= a.count(". ") + 1 <= 4 and a.endswith(".") for a in answers["long_answer"])
    assert all(len(a.split()) <= 2 for a in answers["vqa_short"])
    # benchmark answers are exactly balanced
    bench = _benchmarks(demo)
    for split in ("val", "test"):
        yn = [r["conversations"][-1]["value"] for r in bench[("yes_no", split)]]
        assert abs(yn.count("Yes") - yn.count("No")) <= 1
        mc = collections.Counter(r["conversations"][-1]["value"] for r in bench[("multiple_choice", split)])
        assert max(mc.values()) - min(mc.values()) <= 1
        subtasks = collections.Counter(r["subtask"] for r in bench[("multiple_choice", split)])
        assert set(subtasks) == {"color", "shape"}


def test_both_image_positions(demo: DemoPaths) -> None:
    records = _load(demo.pool) + [r for recs in _benchmarks(demo).values() for r in recs]
    firsts = [r["conversations"][0]["value"] for r in records if "image" in r]
    assert any(v.startswith("<image>\n") for v in firsts)
    assert any(v.endswith("\n<image>") for v in firsts)


def test_no_image_shared_between_pool_and_benchmarks(demo: DemoPaths) -> None:
    def pixels(path: Path) -> bytes:
        with Image.open(path) as img:
            return hashlib.sha256(img.tobytes()).digest()

    pool = {pixels(p) for p in demo.image_root.rglob("*.png")}
    bench = {pixels(p) for p in demo.benchmarks.rglob("*.png")}
    assert pool and bench
    assert not pool & bench


def test_corpus_matches_files(demo: DemoPaths) -> None:
    corpus = demo_corpus("test", seed=0)
    records = _load(demo.pool) + [r for recs in _benchmarks(demo).values() for r in recs]
    texts = [t["value"].replace("<image>", "").strip() for r in records for t in r["conversations"]]
    assert sorted(corpus) == sorted(texts)
    assert not any("<image>" in t for t in corpus)
    assert demo_corpus("test", seed=1) != corpus


def test_deterministic_and_seed_sensitive(demo: DemoPaths, tmp_path: Path) -> None:
    again = generate_demo(tmp_path / "again", "test", seed=0)
    assert _tree_hashes(again.root) == _tree_hashes(demo.root)
    other = generate_demo(tmp_path / "other", "test", seed=1)
    assert _load(other.pool) != _load(demo.pool)


def test_rerun_is_noop_and_stale_dir_is_replaced(tmp_path: Path) -> None:
    small = DemoSize(pool_per_family=4, multi_turn=2, text_only=2, val_per_benchmark=2, test_per_benchmark=2, image_size=16)
    out = tmp_path / "demo"
    paths = generate_demo(out, small, seed=3)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    generate_demo(out, small, seed=3)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert not list(tmp_path.glob("demo.tmp-*")) and not list(tmp_path.glob("demo.old-*"))
    with Image.open(next(paths.image_root.rglob("*.png"))) as img:
        assert img.size == (16, 16)

    # different config => regenerated in place
    generate_demo(out, DemoSize(**{**small.__dict__, "pool_per_family": 5}), seed=3)
    assert collections.Counter(r["family"] for r in _load(paths.pool))["yes_no"] == 5

    # incomplete directory (no DONE marker, e.g. after a crash) => regenerated
    (out / "DONE").unlink()
    (out / "junk.txt").write_text("partial")
    generate_demo(out, small, seed=3)
    assert (out / "DONE").is_file() and not (out / "junk.txt").exists()
    assert json.loads((out / "demo.json").read_text())["seed"] == 3


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_demo(tmp_path / "x", "nope")
    with pytest.raises(ValueError):
        DemoSize(pool_per_family=-1, multi_turn=0, text_only=0, val_per_benchmark=0, test_per_benchmark=0)
    assert not (tmp_path / "x").exists()
    assert os.listdir(tmp_path) == []
