"""The GPU path's pieces, checked on the CPU: autocast with fp32 accumulation, gradient
checkpointing, and the out-of-memory backoff (a fault injected into the forward pass).
The last test runs the same features on CUDA where a GPU is present (marker ``gpu``)."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import pytest
import torch

from icons_dagster.core.config import LoraSettings, ModelConfig
from icons_dagster.core.features.extraction import compute_features
from icons_dagster.core.features.gradients import PerSampleGradients
from icons_dagster.core.model.loading import attach_new_lora, load_base_model, load_processor, resolve_placement, trainable_parameters
from icons_dagster.core.model.encoding import ConversationEncoder, collate
from icons_dagster.core.features.projection import make_projector
from icons_dagster.core.model.samples import SkipLog, encode_records


def _model(tiny_model_dir, **options):
    config = ModelConfig(str(tiny_model_dir), max_length=512, **options)
    placement = resolve_placement(config)
    model = attach_new_lora(load_base_model(config, placement), LoraSettings(r=4, alpha=8, dropout=0.1), seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # off peft's B = 0 so every LoRA matrix has a gradient
        for _, param in trainable_parameters(model):
            param.add_(0.05 * torch.randn_like(param))
    model.eval()
    return model, ConversationEncoder(load_processor(config), 512), placement


def _features(model, encoder, placement, records, batch_size=8, length_grouping=1):
    opener = contextlib.nullcontext(model)
    projector = make_projector("countsketch", 256, 0)
    return compute_features(records, encoder, [lambda: opener], projector, placement, batch_size, length_grouping=length_grouping)


@pytest.fixture(scope="module")
def records(demo_records):
    return list(demo_records[:20])


@pytest.fixture(scope="module")
def reference(tiny_model_dir, records):
    model, encoder, placement = _model(tiny_model_dir, autocast="off")
    return _features(model, encoder, placement, records)


def test_bf16_autocast_runs_the_forward_in_bf16_and_accumulates_in_fp32(tiny_model_dir, records, reference):
    model, encoder, placement = _model(tiny_model_dir, autocast="bfloat16")
    assert placement.autocast is torch.bfloat16 and placement.dtype is torch.float32
    samples = list(encode_records(encoder, records[:4], SkipLog()))
    with PerSampleGradients(model, placement) as hooks:
        hooks.backward(collate(samples, encoder.tokenizer.pad_token_id), placement.device, placement.dtype)
        # LoRA Linears ran in bf16 (their outputs and output gradients), some fed by bf16
        # activations (the residual stream itself may stay fp32) ...
        assert {g.dtype for g in hooks._output_grads.values()} == {torch.bfloat16}
        assert torch.bfloat16 in {x.dtype for x in hooks._inputs.values()}
        # ... and their per-sample gradients are formed in fp32
        assert {block.dtype for _, block in hooks.blocks(len(samples))} == {torch.float32}
    features = _features(model, encoder, placement, records)
    assert features.ids == reference.ids
    a, b = features.features[0].astype(np.float64), reference.features[0].astype(np.float64)
    cosine = (a * b).sum(axis=1)  # both unit rows
    assert cosine.min() > 0.95  # bf16 round-off, not another function
    assert not np.array_equal(a, b)


def test_gradient_checkpointing_gives_the_same_features(tiny_model_dir, records, reference):
    model, encoder, placement = _model(tiny_model_dir, autocast="off", gradient_checkpointing=True)
    assert placement.gradient_checkpointing and model.is_gradient_checkpointing
    features = _features(model, encoder, placement, records)
    assert features.ids == reference.ids
    np.testing.assert_allclose(features.features[0].astype(np.float32), reference.features[0].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(features.norms[0], reference.norms[0], rtol=1e-4)
    assert not model.training  # the caller's mode is restored


def test_under_gradient_checkpointing_the_hooks_hold_one_replayed_layer_at_a_time(tiny_model_dir, records):
    """The hooks keep no input from the forward of a checkpointed layer (that would hold every
    layer's activations and undo the checkpointing): each layer's inputs come from its replay
    in the backward, so while any module is projected, at most one layer's inputs are held."""
    model, encoder, placement = _model(tiny_model_dir, autocast="off", gradient_checkpointing=True)
    samples = list(encode_records(encoder, records[:6], SkipLog()))
    batch = collate(samples, encoder.tokenizer.pad_token_id)
    with PerSampleGradients(model, placement) as hooks:
        per_layer = len(hooks.slots) // model.base_model.model.config.text_config.num_hidden_layers
        held, layers = [], []

        def consume(slot, block):
            held.append(len(hooks._inputs))
            layers.append(slot.name.split(".layers.")[1].split(".")[0])

        hooks.backward(batch, placement.device, placement.dtype, consume=consume)
        assert len(layers) == len(hooks.slots) and len(set(layers)) >= 2
        assert max(held) < per_layer  # the other layers' inputs are not held
        assert not hooks._inputs and not hooks._output_grads


def _fail_above(model, rows: int):
    """Make the model's forward raise CUDA's out-of-memory error for batches above ``rows``."""
    forward = model.forward
    calls = []

    def faulty(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(*args, **kwargs)

    model.forward = faulty
    return calls


@pytest.mark.parametrize("length_grouping", [1, 2])
def test_out_of_memory_halves_the_batch_and_loses_nothing(tiny_model_dir, records, reference, length_grouping):
    model, encoder, placement = _model(tiny_model_dir, autocast="off")
    calls = _fail_above(model, 2)
    features = _features(model, encoder, placement, records, batch_size=8, length_grouping=length_grouping)
    assert calls[:3] == [8, 4, 2]  # 8 and 4 fail, then 2 at a time
    assert (features.oom_backoffs, features.final_batch_size) == (2, 2)
    assert max(calls) == 8 and calls.count(8) == 1  # the smaller size is kept afterwards
    assert features.ids == reference.ids  # every record, in order
    np.testing.assert_allclose(features.features[0].astype(np.float32), reference.features[0].astype(np.float32), atol=2e-3)


def test_a_single_sample_that_does_not_fit_is_an_error_naming_it(tiny_model_dir, records):
    model, encoder, placement = _model(tiny_model_dir, autocast="off")
    _fail_above(model, 0)
    with pytest.raises(RuntimeError, match=f"single sample, {records[0].id}"):
        _features(model, encoder, placement, records, batch_size=4)


@pytest.fixture
def process_determinism(monkeypatch):
    """Restore torch's deterministic-algorithms flag after a test that resolves a CUDA placement."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_features_are_byte_identical_on_a_rerun(tiny_model_dir, records, process_determinism):
    first = _features(*_model(tiny_model_dir, device="cuda"), records)
    second = _features(*_model(tiny_model_dir, device="cuda"), records)
    assert first.features[0].tobytes() == second.features[0].tobytes()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_features_agree_with_the_cpu(tiny_model_dir, records, reference, process_determinism):
    model, encoder, placement = _model(tiny_model_dir, device="cuda", dtype="float32")
    assert placement.autocast is torch.bfloat16  # auto on CUDA
    features = _features(model, encoder, placement, records)
    assert features.ids == reference.ids
    cosine = (features.features[0].astype(np.float64) * reference.features[0].astype(np.float64)).sum(axis=1)
    assert cosine.min() > 0.95


def test_a_cuda_placement_turns_on_deterministic_kernels_unless_told_not_to(process_determinism):
    torch.use_deterministic_algorithms(False)
    resolve_placement(ModelConfig("x", device="cuda", deterministic=False))
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    resolve_placement(ModelConfig("x", device="cpu"))  # the CPU kernels are deterministic already
    assert not torch.are_deterministic_algorithms_enabled()
    resolve_placement(ModelConfig("x", device="cuda"))
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_placement_defaults(process_determinism):
    cpu = resolve_placement(ModelConfig("x", device="cpu"))
    assert (cpu.dtype, cpu.autocast, cpu.gradient_checkpointing) == (torch.float32, None, False)
    cuda = resolve_placement(ModelConfig("x", device="cuda"))
    assert (cuda.dtype, cuda.autocast) == (torch.bfloat16, torch.bfloat16)
    off = resolve_placement(dataclasses.replace(ModelConfig("x", device="cuda"), autocast="off"))
    assert off.autocast is None
    with pytest.raises(ValueError, match="autocast"):
        ModelConfig("x", autocast="int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_alignment_is_byte_identical_on_a_rerun_and_learns(tiny_model_dir, tmp_path, process_determinism):
    """``align --device cuda``: a real checkpoint's stage 1 on the GPU, deterministic kernels on."""
    from icons_dagster.core.model.alignment import AlignmentRecipe, align
    from icons_dagster.demo.data import ALIGN_FILE, generate_alignment_data

    captions = generate_alignment_data(tmp_path / "caps", 40)
    recipe = AlignmentRecipe(steps=8, batch_size=8, heldout_fraction=0.25, device="cuda")
    first = align(captions / ALIGN_FILE, captions / "images", tiny_model_dir, tmp_path / "a", recipe)
    second = align(captions / ALIGN_FILE, captions / "images", tiny_model_dir, tmp_path / "b", recipe)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    held = first.report["heldout"]
    assert held["loss_after"] < held["loss_before"] - 1.0 and first.report["recipe"]["device"] == "cuda" and not second.reused
