"""The LLaVA-665K-shaped world (icons_dagster.demo.mix): the pre-registered design, checked."""

from __future__ import annotations

import collections
import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from icons_dagster.core.data.records import load_records
from icons_dagster.demo.mix import (
    CAPTIONS_FILE,
    MIX_BENCHMARKS,
    MIX_SIZES,
    MIX_SOURCES,
    OFF_TARGET_SOURCES,
    QUESTIONS_PER_IMAGE,
    TEXT_FORMATS,
    TEXTS_FILE,
    _pool_drafts,
    generate_mix,
    generate_mix_captions,
    generate_mix_texts,
)

TEST = MIX_SIZES["mix-test"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    return generate_mix(tmp_path_factory.mktemp("mix") / "world", "mix-test")


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _pixels(path: Path) -> str:
    return hashlib.sha256(Image.open(path).convert("RGB").tobytes()).hexdigest()


def test_full_world_has_the_registered_mix():
    """3,000 records in LLaVA-1.5's proportions, 26% off-target, 10% wrong per image source."""
    drafts = _pool_drafts(MIX_SIZES["mix"], 0)
    records = [d.record for d in drafts]
    assert len(records) == 3000 and len({r["id"] for r in records}) == 3000
    counts = collections.Counter(r["source"] for r in records)
    assert counts == {s: round(share * 3000) for s, share in MIX_SOURCES.items()}
    assert sum(counts[s] for s in OFF_TARGET_SOURCES) == 780  # 12% + 8% + 6%
    wrong = collections.Counter(r["source"] for r in records if r.get("wrong"))
    assert wrong == {s: round(0.1 * n) for s, n in counts.items() if s != "text_chat"}
    # redundancy: the per-image sources ask exactly their number of questions of each image
    for source, per in QUESTIONS_PER_IMAGE.items():
        by_image = collections.Counter(r["image"] for r in records if r["source"] == source)
        assert set(by_image.values()) == {per}, source
    image_users = collections.Counter(r.get("image") for r in records)
    on_target = [r for r in records if r["source"] not in OFF_TARGET_SOURCES]
    shared = sum(image_users[r["image"]] > 1 for r in on_target) / len(on_target)
    assert 0.35 <= shared <= 0.5  # "about 40%" share an image with another record


def test_wrong_answers_are_the_only_difference_from_a_clean_world():
    """The noise is a separate random stream: with it off, every record is the same except
    the marked ones, which differ in exactly one answer turn and nowhere else."""
    noisy = {d.record["id"]: d.record for d in _pool_drafts(TEST, 0)}
    clean = {d.record["id"]: d.record for d in _pool_drafts(replace(TEST, wrong_fraction=0.0), 0)}
    assert noisy.keys() == clean.keys()
    n_wrong = 0
    for rid, record in noisy.items():
        turns, truth = record["conversations"], clean[rid]["conversations"]
        differing = [i for i, (a, b) in enumerate(zip(turns, truth, strict=True)) if a != b]
        if record.get("wrong"):
            n_wrong += 1
            assert len(differing) == 1 and turns[differing[0]]["from"] == "gpt", rid
        else:
            assert not differing, rid
    assert n_wrong == sum(round(0.1 * n) for s, n in TEST.source_counts().items() if s != "text_chat")


def test_world_files(world):
    pool = _json(world.pool)
    assert len(pool) == TEST.pool
    loaded = load_records(world.pool, world.image_root)
    assert not loaded.problems and len(loaded.records) == TEST.pool
    # records about the same image share the file; every other pair of images differs in pixels
    fact_images = collections.defaultdict(set)
    for r in pool:
        if "image" in r:
            fact_images[r["fact"]].add(r["image"])
    assert all(len(images) == 1 for images in fact_images.values())
    pool_pixels = {_pixels(p) for p in world.image_root.rglob("*.png")}
    assert len(pool_pixels) == len(list(world.image_root.rglob("*.png")))
    # no pool source shows a digit scan (vizwiz_b's images are new to every pool source)
    assert {p.parent.name for p in world.image_root.rglob("*.png")} <= {"shapes", "photos", "text", "covers"}

    bench_pixels = set()
    for name, kind in MIX_BENCHMARKS.items():
        folder = world.benchmarks / name
        assert _json(folder / "benchmark.json") == {"answers": kind}
        for split, n in (("val", TEST.val_per_benchmark), ("test", TEST.test_per_benchmark)):
            records = _json(folder / f"{split}.json")
            assert len(records) == n
            for r in records:
                question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
                assert "bounding box" not in question and not re.search(r"\[\d\.\d\d,", answer), r["id"]
                if kind == "yes_no":
                    assert answer in ("Yes", "No")
                if kind == "multiple_choice":
                    assert answer in "ABCD" and f"{answer}. " in question
                bench_pixels.add(_pixels(folder / "images" / r["image"]))
    assert not bench_pixels & pool_pixels  # benchmarks never share an image with the pool


def test_benchmark_answers_are_balanced():
    """Yes/no splits are half yes, multiple-choice keys spread over the letters (no free lunch
    for a model that always answers one way)."""
    from icons_dagster.demo.mix import _benchmark_drafts

    drafts = _benchmark_drafts(MIX_SIZES["mix"], 0)
    for name, kind in MIX_BENCHMARKS.items():
        answers = collections.Counter(d.record["conversations"][1]["value"] for d in drafts[name]["test"])
        if kind == "yes_no":
            assert answers == {"Yes": 100, "No": 100}, name
        if kind == "multiple_choice":
            assert set(answers) == set("ABCD") and max(answers.values()) <= 52, name


def test_same_arguments_give_identical_files(world, tmp_path):
    again = generate_mix(tmp_path / "again", "mix-test")

    def tree(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}

    assert tree(world.root) == tree(again.root)


def test_captions_are_llava_records_of_new_images(world, tmp_path):
    folder = generate_mix_captions(tmp_path / "captions", 40, world="mix-test")
    loaded = load_records(folder / CAPTIONS_FILE, folder / "images")
    assert not loaded.problems and len(loaded.records) == 40
    world_pixels = {_pixels(p) for p in world.root.rglob("*.png")}
    caption_pixels = {_pixels(p) for p in (folder / "images").rglob("*.png")}
    assert len(caption_pixels) == 40 and not caption_pixels & world_pixels


def test_texts_answer_from_the_description_they_carry(tmp_path):
    """Text-only records: balanced formats and yes/no and letter answers; every answer is
    right about the description in the same turn (checked here from the text alone)."""
    folder = generate_mix_texts(tmp_path / "texts", 400)
    assert generate_mix_texts(tmp_path / "again", 400).joinpath(TEXTS_FILE).read_bytes() == (folder / TEXTS_FILE).read_bytes()
    loaded = load_records(folder / TEXTS_FILE, folder)
    assert not loaded.problems and len(loaded.records) == 400 and all(r.image_path is None for r in loaded.records)
    records = _json(folder / TEXTS_FILE)
    assert collections.Counter(r["format"] for r in records) == {f: 100 for f in TEXT_FORMATS}
    yes_no = collections.Counter(r["conversations"][1]["value"] for r in records if r["format"] == "yes_no")
    letters = collections.Counter(r["conversations"][1]["value"] for r in records if r["format"] == "mc")
    assert set(yes_no) == {"Yes", "No"} and min(yes_no.values()) >= 35
    assert set(letters) == set("ABCD") and min(letters.values()) >= 15
    checked = collections.Counter()
    for r in records:
        human, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        description = next(line for line in human.split("\n") if line.startswith(("The image shows", "This is a")))
        if r["format"] == "mc" and (m := re.search(rf"^{answer}\. (.+)$", human, re.M)) and r["kind"] in ("single", "text", "cover", "digit"):
            option = m.group(1)
            counted = f"shows {option} shape" in description  # a count option
            assert option in description.replace("The image shows the digit", "") or counted, r
            checked["mc"] += 1
        elif m := re.search(r"^Is there an? (\w+) (\w+) in the image\?$", human, re.M):
            assert (answer == "Yes") == (f"a {m.group(1)} {m.group(2)}" in description), r
            checked["exists"] += 1
        elif r["format"] == "short" and r["kind"] in ("text", "cover", "digit"):
            assert answer in description, r
            checked["short"] += 1
    assert min(checked.values()) >= 20, checked


def test_bootstrap_builds_the_world_and_its_aligned_base_model(world, tmp_path):
    """``--size mix-test`` (here on world seed 1, the confirmation's): the world, a base model
    whose tokenizer knows the world's texts, first trained on text about the world, aligned on
    the world's captions, and the mix settings (the paper's 5% warm-up)."""
    from icons_dagster.core.model.alignment import REPORT_FILE
    from icons_dagster.demo.bootstrap import bootstrap_demo, demo_sizes
    from icons_dagster.demo.stage1 import MIX_TEXT_PHASES

    assert {"mix", "mix-test"} <= set(demo_sizes())
    config = bootstrap_demo(tmp_path, "mix-test", world_seed=1)
    assert Path(config.data.pool).name == "pool.json" and len(_json(Path(config.data.pool))) == TEST.pool
    assert "seed1" in config.model.name_or_path and "seed1" in config.data.pool
    assert _json(Path(config.data.pool)) != _json(world.pool)  # another world than seed 0's
    assert sorted(p.name for p in Path(config.data.benchmarks).iterdir()) == sorted(MIX_BENCHMARKS)
    assert config.warmup.ratio == 0.05
    report = _json(Path(config.model.name_or_path) / REPORT_FILE)
    assert report["recipe"]["steps"] == 40 and report["n_records"] == 64
    # aligned from the last text phase's checkpoint, each phase from the one before, the first from the random model
    phases, source = [], Path(report["model"])
    while (source / REPORT_FILE).is_file():
        phases.append(_json(source / REPORT_FILE))
        source = Path(phases[-1]["model"])
    assert len(phases) == len(MIX_TEXT_PHASES) and source.name == "tiny-llava-mix-test-seed1"
    for phase, text_stage in zip(reversed(MIX_TEXT_PHASES), phases, strict=True):
        assert text_stage["recipe"]["train"] == "lm" and text_stage["recipe"]["steps"] == phase.steps["mix-test"]
        assert text_stage["trained"] == ["model.language_model", "lm_head"] and text_stage["captions"]["n_problems"] == 0
        assert text_stage["heldout"]["loss_after"] < text_stage["heldout"]["loss_before"] - 1.0
    held = report["heldout"]
    assert held["loss_after"] < held["loss_before"] - 1.0  # 40 steps already learn the caption language
    # the tokenizer was trained on the world: a box answer takes fewer tokens than bytes
    from transformers import AutoTokenizer

    box = "[0.12, 0.30, 0.45, 0.62]"
    tokens = AutoTokenizer.from_pretrained(config.model.name_or_path)(box)["input_ids"]
    assert len(tokens) < len(box) - 2  # BOS + one token per byte without merges learned from the world's boxes


def test_evaluation_composition_by_source_and_wrong_answers(world, tmp_path):
    """The table's composition on the mix world's labels: each method's source shares and wrong
    share, the random seeds' mean, and the pool's own row, counted by hand."""
    import polars as pl

    from icons_dagster.core.stages.evaluation import SUBSETS_FILE, composition_by_label
    from icons_dagster.core.stages.icons import stage_pool
    from icons_dagster.core.storage.artifacts import ArtifactStore
    from icons_dagster.core.storage.refs import EvaluationSubsetsRef

    store = ArtifactStore(tmp_path / "home")
    pool_ref = stage_pool(store, world.pool, world.image_root, 2).ref
    records = _json(world.pool)
    ids = [r["id"] for r in records]
    chosen = {"random-0": ids[:40], "random-1": ids[40:80], "icons": [r["id"] for r in records if r["source"] == "mc"]}
    folder = tmp_path / "subsets"
    folder.mkdir()
    pl.DataFrame(
        {"method": [m for m, c in chosen.items() for _ in c], "part": [None] * sum(map(len, chosen.values())), "id": [i for c in chosen.values() for i in c]},
        schema={"method": pl.String, "part": pl.String, "id": pl.String},
    ).write_parquet(folder / SUBSETS_FILE)
    subsets = EvaluationSubsetsRef("evaluation_subsets", "f" * 16, str(folder))
    rows, markdown = composition_by_label(store, pool_ref, subsets, None)
    by_method = {r["method"]: r for r in rows}
    assert list(by_method) == ["random-0", "random-1", "icons", "random (mean of 2)", "pool"]
    by_id = {r["id"]: r for r in records}

    def expected(subset: list[str]) -> tuple[float, float]:
        return sum(by_id[i]["source"] == "mc" for i in subset) / len(subset), sum(bool(by_id[i].get("wrong")) for i in subset) / len(subset)

    for method, subset in [*chosen.items(), ("pool", ids)]:
        assert (by_method[method]["share:mc"], by_method[method]["wrong_share"]) == pytest.approx(expected(subset)), method
        assert by_method[method]["n"] == len(subset) and by_method[method]["mean_vds"] is None
    assert by_method["icons"]["share:mc"] == 1.0 and sum(v for k, v in by_method["pool"].items() if k.startswith("share:")) == pytest.approx(1.0)
    mean = by_method["random (mean of 2)"]
    assert mean["wrong_share"] == pytest.approx((by_method["random-0"]["wrong_share"] + by_method["random-1"]["wrong_share"]) / 2)
    assert markdown.splitlines()[0] == "| Method | n | wrong | " + " | ".join(sorted(MIX_SOURCES)) + " |"


def test_source_quota_subset_follows_the_voters_source_mix(world, tmp_path):
    """``icons-quota`` on the mix world: the sources' places are the voters' source mix, each
    filled with that source's best records in the paper rule's order."""
    import numpy as np
    import polars as pl

    from icons_dagster.core.selection import consensus
    from icons_dagster.core.stages.evaluation import _group_labels, method_subset
    from icons_dagster.core.stages.icons import stage_pool
    from icons_dagster.core.storage.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path / "home")
    pool_ref = stage_pool(store, world.pool, world.image_root, 2).ref
    records = _json(world.pool)
    labels = _group_labels(store, pool_ref, {"source"}, None)
    assert labels["source"] == {r["id"]: r["source"] for r in records}
    ids = [r["id"] for r in records]
    scores = np.random.default_rng(3).normal(size=(len(ids), 4))
    vote_frame = pl.DataFrame({"id": ids, **{f"influence__b{k}": scores[:, k] for k in range(4)}})
    chosen = method_subset("icons-quota", ids, 0.2, vote_frame, group_labels=labels)
    m = consensus.subset_size(len(ids), 0.2)
    voters = consensus.votes(scores, consensus.vote_thresholds(scores, 0.2)).any(axis=1)
    sources = [labels["source"][i] for i in ids]
    quotas = consensus.group_quotas(sources, voters, m)
    assert len(chosen) == m and collections.Counter(labels["source"][i] for i in chosen) == {s: q for s, q in quotas.items() if q}
    paper = consensus.select(ids, scores, 0.2).order.tolist()
    for source, q in quotas.items():
        best = [ids[i] for i in paper if sources[i] == source][:q]
        assert sorted(best) == sorted(i for i in chosen if labels["source"][i] == source)
    with pytest.raises(ValueError, match="source label"):
        method_subset("icons-quota", ids, 0.2, vote_frame)
