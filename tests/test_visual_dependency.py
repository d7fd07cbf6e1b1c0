"""Visual Dependency Score (ICONS App. B.3, loss form) on the tiny model: its definition, the
seeded noise, text-only and broken records, and what the evaluation reads from the table.

The stage and its asset run in the evaluation graph test (tests/test_evaluation_graph.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from icons_dagster.core.config import ModelConfig
from icons_dagster.core.data.records import load_image
from icons_dagster.core.features.visual_dependency import (
    NOISE_SEED,
    SCORED,
    SKIPPED,
    TEXT_ONLY,
    noise_pixels,
    record_seed,
    visual_dependency,
    with_noise_image,
)
from icons_dagster.core.model.encoding import ConversationEncoder, EncodedSample, EncodingError, collate, per_sample_loss
from icons_dagster.core.model.loading import load_base_model, load_processor, resolve_placement
from icons_dagster.core.stages.visual_dependency import VDS_FILE, mean_visual_dependency, vds_metadata
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.core.storage.refs import VisualDependencyRef


def test_the_noise_is_a_standard_normal_seeded_by_the_record():
    like = torch.zeros((1, 3, 64, 64))
    first = noise_pixels(like, "rec-1")
    assert first.shape == like.shape and first.dtype == torch.float32
    assert torch.equal(first, noise_pixels(like, "rec-1"))  # same record, same draw
    assert not torch.equal(first, noise_pixels(like, "rec-2"))
    assert not torch.equal(first, noise_pixels(like, "rec-1", seed=NOISE_SEED + 1))
    assert abs(float(first.mean())) < 0.05 and abs(float(first.std()) - 1.0) < 0.05  # 12,288 draws of N(0, 1)
    assert noise_pixels(like.to(torch.bfloat16), "rec-1").dtype == torch.bfloat16
    assert record_seed("rec-1") == record_seed("rec-1") < 2**63  # a valid torch seed, stable across processes

    ids, labels = torch.tensor([1, 2, 3]), torch.tensor([-100, 2, 3])
    sizes = torch.tensor([[32, 32]])
    sample = EncodedSample("rec-1", ids, labels, {"pixel_values": like, "image_sizes": sizes}, n_answer_tokens=2)
    noisy = with_noise_image(sample)
    assert torch.equal(noisy.image_inputs["pixel_values"], first)
    assert noisy.image_inputs["image_sizes"] is sizes and noisy.input_ids is ids and noisy.labels is labels
    assert torch.equal(sample.image_inputs["pixel_values"], like)  # the original is untouched
    with pytest.raises(EncodingError, match="pixel_values"):
        with_noise_image(dataclasses.replace(sample, image_inputs={}))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    config = ModelConfig(str(tiny_model_dir), max_length=512)
    placement = resolve_placement(config)
    return load_base_model(config, placement), ConversationEncoder(load_processor(config), config.max_length), placement


@pytest.fixture(scope="module")
def records(demo_records, tmp_path_factory):
    """Two image records of each of three families, a text-only record and an unreadable image."""
    chosen = []
    for family in ("vqa_short", "yes_no", "long_answer"):
        chosen += [r for r in demo_records if r.id.startswith(family + "-")][:2]
    broken = tmp_path_factory.mktemp("broken") / "broken.png"
    broken.write_bytes(b"not a png")
    text_only = next(r for r in demo_records if r.image_path is None)
    return [*chosen[:3], text_only, dataclasses.replace(chosen[0], id="broken-image", image_path=broken), *chosen[3:]]


@pytest.fixture(scope="module")
def scored(tiny, records):
    model, encoder, placement = tiny
    return visual_dependency(records, encoder, model, placement, batch_size=3, length_grouping=2)


def test_vds_is_noise_loss_minus_own_loss_with_nulls_for_text_only(scored, records):
    frame = scored.frame()
    assert frame["id"].to_list() == [r.id for r in records]  # input order, one row per record
    expected_status = [TEXT_ONLY if r.image_path is None else SCORED for r in records]
    expected_status[records.index(next(r for r in records if r.id == "broken-image"))] = SKIPPED
    assert frame["status"].to_list() == expected_status
    assert [i for i, _ in scored.skips.entries] == ["broken-image"]
    assert "broken.png" in scored.skips.entries[0][1]
    # exactly the difference of the two stored float32 losses
    assert frame["vds"].to_list() == frame.select(pl.col("loss_noise") - pl.col("loss_image"))["loss_noise"].to_list()
    unscored = frame.filter(pl.col("status") != SCORED)
    assert unscored["vds"].null_count() == unscored["loss_image"].null_count() == unscored["loss_noise"].null_count() == 2
    assert unscored["n_answer_tokens"].to_list() == [0, 0]
    ran = frame.filter(pl.col("status") == SCORED)
    assert ran.height == 6 and ran["vds"].null_count() == 0
    assert (ran["loss_image"] > 0).all() and (ran["vds"] != 0).all()  # a random projector still sees the pixels


def test_both_losses_are_the_single_record_answer_losses(tiny, scored, records):
    """Each loss is what an independent single-record forward gives: the full head, no padding,
    the record's own pixels or N(0, 1) drawn from its own seeded generator."""
    model, encoder, placement = tiny
    frame = scored.frame()
    for record in records:
        if record.image_path is None or record.id == "broken-image":
            continue
        sample = encoder.encode(record.id, record.turns, load_image(record.image_path))
        pixels = sample.image_inputs["pixel_values"]
        generator = torch.Generator().manual_seed(record_seed(record.id))
        noise = dataclasses.replace(sample, image_inputs={"pixel_values": torch.randn(pixels.shape, generator=generator)})
        row = frame.filter(pl.col("id") == record.id).row(0, named=True)
        with torch.no_grad():
            for encoded, column in ((sample, "loss_image"), (noise, "loss_noise")):
                batch = collate([encoded], encoder.tokenizer.pad_token_id)
                logits = model(**batch.model_inputs(placement.device, placement.dtype)).logits
                assert row[column] == pytest.approx(float(per_sample_loss(logits, batch.labels)[0]), rel=1e-5), (record.id, column)
        assert row["n_answer_tokens"] == sample.n_answer_tokens


def test_the_same_inputs_give_byte_identical_scores(tiny, scored, records):
    model, encoder, placement = tiny
    again = visual_dependency(records, encoder, model, placement, batch_size=3, length_grouping=2)
    for column in ("loss_image", "loss_noise", "vds"):
        assert getattr(again, column).tobytes() == getattr(scored, column).tobytes(), column
    assert again.status == scored.status


def test_a_model_that_cannot_see_has_zero_dependency(tiny, records):
    """With the projector's output layer zeroed every image reaches the language model as the
    same zeros: own image and noise give bit-identical losses, VDS exactly 0."""
    model, encoder, placement = tiny
    layer = model.model.multi_modal_projector.linear_2
    saved = layer.weight.detach().clone(), layer.bias.detach().clone()
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    try:
        blind = visual_dependency(records, encoder, model, placement, batch_size=3, length_grouping=2)
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved[0])
            layer.bias.copy_(saved[1])
    ran = np.array([s == SCORED for s in blind.status])
    assert ran.sum() == 6
    assert (blind.vds[ran] == 0).all() and np.isnan(blind.vds[~ran]).all()


def _table() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": ["a", "b", "c", "d", "e"],
            "status": [SCORED, SCORED, SCORED, TEXT_ONLY, SKIPPED],
            "loss_image": [1.0, 2.0, 3.0, None, None],
            "loss_noise": [1.5, 1.0, 4.0, None, None],
            "vds": [0.5, -1.0, 1.0, None, None],
            "n_answer_tokens": [2, 3, 4, 0, 0],
        },
        schema_overrides={"loss_image": pl.Float32, "loss_noise": pl.Float32, "vds": pl.Float32, "n_answer_tokens": pl.Int32},
    )


def test_metadata_counts_and_means_per_family():
    metadata = vds_metadata(_table(), {"family": ["x", "x", "y", "y", None]})
    assert (metadata["n"], metadata["n_scored"], metadata["n_text_only"]) == (5, 3, 1)
    assert metadata["mean_vds"] == pytest.approx(0.5 / 3) and metadata["median_vds"] == pytest.approx(0.5)
    assert metadata["share_positive_vds"] == pytest.approx(2 / 3)
    assert metadata["mean_loss_image"] == pytest.approx(2.0) and metadata["mean_loss_noise"] == pytest.approx(6.5 / 3)
    assert metadata["mean_vds_by_family"] == {
        "(none)": {"n": 1, "n_scored": 0, "mean_vds": None},
        "x": {"n": 2, "n_scored": 2, "mean_vds": pytest.approx(-0.25)},
        "y": {"n": 2, "n_scored": 1, "mean_vds": pytest.approx(1.0)},
    }
    assert metadata["table"].splitlines() == [
        "| family | records | scored | mean VDS |",
        "|---|---|---|---|",
        "| (none) | 1 | 0 | - |",
        "| x | 2 | 2 | -0.2500 |",
        "| y | 2 | 1 | 1.0000 |",
    ]
    assert "vds_histogram" in metadata["plots"]
    nothing = vds_metadata(_table().filter(pl.col("status") != SCORED), {})
    assert nothing["mean_vds"] is None and "table" not in nothing and "plots" not in nothing


def test_a_subsets_mean_vds_skips_records_without_one(tmp_path):
    store = ArtifactStore(tmp_path)
    folder = store.artifact_dir("visual_dependency", "fp")
    folder.mkdir(parents=True)
    _table().write_parquet(folder / VDS_FILE)
    ref = VisualDependencyRef(stage="visual_dependency", fingerprint="fp", path=store.relative(folder), n_records=5, n_scored=3)
    assert mean_visual_dependency(store, ref, ["a", "b", "d"]) == pytest.approx(-0.25)  # d is text-only
    assert mean_visual_dependency(store, ref, ["c", "e"]) == pytest.approx(1.0)  # e was skipped
    assert mean_visual_dependency(store, ref, ["d", "e"]) is None
    with pytest.raises(ValueError, match=r"1 id\(s\) are not in visual_dependency \(fp\), e.g. \['zz'\]"):
        mean_visual_dependency(store, ref, ["a", "zz"])
