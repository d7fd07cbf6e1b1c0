"""Other architectures through the same path: Idefics3 (SmolVLM's), Qwen2.5-VL and a text-only causal LM.

Each is a tiny random checkpoint of the real transformers class, built locally, loaded
through the auto classes and its own processor / chat template, and taken through LoRA
targeting, answer labelling, batched per-sample gradients (against the batch-1 loop), a
warm-up, gradient features and influence.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from icons_dagster.core.config import GradientConfig, LoraSettings, ModelConfig, WarmupConfig
from icons_dagster.core.model.encoding import IGNORE_INDEX, EncodingError, collate
from icons_dagster.core.features.extraction import load_features, load_samples
from icons_dagster.core.features.gradients import PerSampleGradients, loop_gradients
from icons_dagster.core.model.loading import language_model_path, lora_target_names, trainable_parameters
from icons_dagster.core.stages.icons import (
    ModelCache,
    stage_influences,
    stage_pool,
    stage_train_shard,
    stage_validation,
    stage_warmup_checkpoint,
    stage_warmup_subset,
)
from icons_dagster.core.data.records import load_image
from icons_dagster.core.model.samples import SkipLog, encode_records
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.demo.data import demo_corpus
from icons_dagster.demo.tiny_architectures import TinyArchSpec, build_tiny_architecture

ARCHS = {
    # architecture: (model class, language-model path, is multimodal)
    "idefics3": ("Idefics3ForConditionalGeneration", "model.text_model", True),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "model.language_model", True),
    "text_lm": ("Qwen2ForCausalLM", "model", False),
}
SPEC = TinyArchSpec()


def _text_only(record: dict) -> dict:
    """The record without its image (the ``<image>`` placeholder dropped from its turns)."""
    turns = [{**t, "value": t["value"].replace("<image>", "").strip()} for t in record["conversations"]]
    return {k: v for k, v in record.items() if k != "image"} | {"conversations": turns}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, demo_paths, tmp_path_factory):
    """(name, ModelConfig, ModelCache, pool path, image root, benchmarks dir) for one architecture."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    folder = build_tiny_architecture(name, root / "checkpoint", demo_corpus("test"), SPEC)
    if ARCHS[name][2]:
        pool, benchmarks = demo_paths.pool, demo_paths.benchmarks
    else:  # a text pool (LESS's setting) with one image record left in, which must be skipped and listed
        records = json.loads(demo_paths.pool.read_text())
        kept = [_text_only(r) for r in records]
        first_image = next(i for i, r in enumerate(records) if "image" in r)
        kept[first_image] = records[first_image]
        pool = root / "pool.json"
        pool.write_text(json.dumps(kept))
        benchmarks = root / "benchmarks"
        for bench in ("vqa_short", "long_answer"):
            (benchmarks / bench).mkdir(parents=True)
            val = json.loads((demo_paths.benchmarks / bench / "val.json").read_text())
            (benchmarks / bench / "val.json").write_text(json.dumps([_text_only(r) for r in val]))
    config = ModelConfig(str(folder), max_length=512)
    return name, config, ModelCache(), pool, demo_paths.image_root, benchmarks


def test_auto_classes_and_lora_on_the_language_model_only(arch):
    name, config, models, *_ = arch
    _, base, _ = models.get(config)
    assert type(base).__name__ == ARCHS[name][0]
    assert language_model_path(base) == ARCHS[name][1]
    targets = lora_target_names(base, "auto")
    # every Linear of every decoder layer: q, k, v, o, gate, up, down
    assert len(targets) == 7 * SPEC.layers
    assert all(t.startswith(ARCHS[name][1] + ".layers.") for t in targets)
    assert not any(word in t for t in targets for word in ("vision", "connector", "projector", "lm_head"))


def _pool_records(arch):
    from icons_dagster.core.data.records import load_records

    _, _, _, pool, image_root, _ = arch
    return load_records(pool, image_root).records


def test_only_answer_tokens_are_labelled(arch):
    name, config, models, *_ = arch
    encoder = models.encoder(config)
    record = next(r for r in _pool_records(arch) if r.id.startswith("vqa_short"))
    image = load_image(record.image_path) if record.image_path else None
    sample = encoder.encode(record.id, record.turns, image)
    labelled = encoder.tokenizer.decode(sample.labels[sample.labels != IGNORE_INDEX])
    answer = record.turns[-1].text
    assert answer in labelled and record.turns[0].text.replace("<image>", "").strip()[:20] not in labelled
    # the labelled run is the answer plus the end-of-turn markup, nothing of the prompt
    assert len(labelled) < len(answer) + 30
    if ARCHS[name][2]:
        assert sample.image_inputs, "the image reached the processor"
        assert int((sample.input_ids == encoder.image_token_id).sum()) > 0


def test_text_only_model_refuses_an_image_record(arch):
    name, config, models, *_ = arch
    if ARCHS[name][2]:
        pytest.skip("multimodal")
    encoder = models.encoder(config)
    record = next(r for r in _pool_records(arch) if r.image_path is not None)
    with pytest.raises(EncodingError, match="text-only"):
        encoder.encode(record.id, record.turns, load_image(record.image_path))


def test_batched_per_sample_gradients_equal_the_batch1_loop(arch):
    name, config, models, *_ = arch
    encoder = models.encoder(config)
    _, base, placement = models.get(config)
    records = [r for r in _pool_records(arch) if ARCHS[name][2] or r.image_path is None]
    picks = [next(r for r in records if r.id.startswith(prefix)) for prefix in ("text_only", "long_answer", "vqa_short", "counting")]
    samples = list(encode_records(encoder, picks, SkipLog()))
    assert len({s.input_ids.numel() for s in samples}) >= 3  # real padding
    pad = encoder.tokenizer.pad_token_id
    with models.with_adapter(config, None, LoraSettings(r=4, alpha=8, dropout=0.0), seed=0) as model:
        torch.manual_seed(1)
        with torch.no_grad():  # off peft's B = 0 so A's gradients are not all zero
            for _, param in trainable_parameters(model):
                param.add_(0.05 * torch.randn_like(param))
        model.eval()
        with PerSampleGradients(model) as hooks:
            batched = hooks.full_gradients(collate(samples, pad), placement.device, placement.dtype)
        reference = loop_gradients(model, samples, pad, placement.device, placement.dtype)
    assert (reference.norm(dim=1) > 0).all()
    torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-6)


def test_warmup_features_and_influence(arch, tmp_path):
    name, config, models, pool, image_root, benchmarks = arch
    store = ArtifactStore(tmp_path / "store")
    pool_ref = stage_pool(store, pool, image_root, num_shards=2).ref
    warmup = WarmupConfig(ratio=0.5, epochs=1, batch_size=4, learning_rate=1e-3)
    lora = LoraSettings(r=4, alpha=8)
    subset = stage_warmup_subset(store, pool_ref, warmup).ref
    ckpt = stage_warmup_checkpoint(store, pool_ref, subset, config, lora, warmup, models, image_root=image_root)
    assert (store.absolute(ckpt.ref.path) / "checkpoint-0" / "adapter" / "adapter_model.safetensors").is_file()
    gradients = GradientConfig(dim=64, seed=3, batch_size=4)
    shards = {s: stage_train_shard(store, s, pool_ref, ckpt.ref, config, gradients, models, image_root=image_root) for s in ("shard-0000", "shard-0001")}
    n_pool = pool_ref.n_records
    n_features = sum(r.ref.n_samples for r in shards.values())
    skipped = sum(r.metadata["skipped_count"] for r in shards.values())
    assert n_features + skipped == n_pool  # nothing lost silently
    assert skipped == (0 if ARCHS[name][2] else 1)
    if not ARCHS[name][2]:
        reasons = [e["reason"] for r in shards.values() for e in r.metadata["skipped"]]
        assert any("text-only" in reason for reason in reasons)
    bench = "vqa_short"
    validation = stage_validation(store, bench, benchmarks, image_root, ckpt.ref, config, gradients, models).ref
    influence = stage_influences(store, pool_ref, ckpt.ref, {s: r.ref for s, r in shards.items()}, {bench: validation}, 0.2)[bench].ref
    frame = pl.read_parquet(store.absolute(influence.path) / "influence.parquet")
    # eq. 3 by hand: the mean cosine of each training feature to the validation features
    val = load_features(store.absolute(validation.path), 0, mmap=False).astype(np.float64)
    for shard, result in shards.items():
        directory = store.absolute(result.ref.path)
        train = load_features(directory, 0, mmap=False).astype(np.float64)
        assert np.allclose(np.linalg.norm(train, axis=1), 1.0, atol=2e-3)
        expected = (train @ val.T).mean(axis=1)
        got = frame.filter(pl.col("shard") == shard)["influence"].to_numpy()
        assert load_samples(directory)["id"].to_list() == frame.filter(pl.col("shard") == shard)["id"].to_list()
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert np.std(frame["influence"].to_numpy()) > 0


def test_qwen_processor_loads_without_its_video_part_and_expands_images_by_the_grid(arch, caplog):
    """transformers 5 cannot load a Qwen-VL processor without a video processor (torchvision):
    load_processor falls back to the same class without video, and the image placeholder still
    expands to grid_t * grid_h * grid_w / merge^2 tokens, the model's own count."""
    name, config, *_ = arch
    if name != "qwen2_5_vl":
        pytest.skip("Qwen2.5-VL only")
    from PIL import Image
    from transformers import AutoProcessor

    from icons_dagster.core.model.loading import load_processor

    with pytest.raises(OSError, match="video processor"):
        AutoProcessor.from_pretrained(config.name_or_path)
    with caplog.at_level("WARNING"):
        processor = load_processor(config)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and "without its video processor" in caplog.text
    out = processor(text=["look <|vision_start|><|image_pad|><|vision_end|> here"], images=[Image.new("RGB", (40, 24))], return_tensors="pt")
    expected = int(out["image_grid_thw"][0].prod()) // processor.image_processor.merge_size**2
    assert expected >= 1 and int((out["input_ids"] == processor.image_token_id).sum()) == expected
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"][0].prod())


@pytest.mark.parametrize("missing", ["/no/such/checkpoint", "./models/llava-missing", "data/models/llava"])
def test_a_missing_checkpoint_folder_is_named_not_read_as_a_hub_id(missing, tmp_path, monkeypatch):
    from icons_dagster.core.model.loading import load_base_model, load_processor, resolve_placement

    monkeypatch.chdir(tmp_path)
    config = ModelConfig(missing)
    with pytest.raises(FileNotFoundError, match=f"model '{missing}': no such checkpoint folder"):
        load_processor(config)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_base_model(config, resolve_placement(config))
