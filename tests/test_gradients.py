"""Batched per-sample LoRA gradients against the batch-1 loop, and the features built on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icons_dagster.core.config import LoraSettings, ModelConfig
from icons_dagster.core.model.encoding import ConversationEncoder, collate
from icons_dagster.core.features.gradients import PerSampleGradients, adam_precondition, loop_gradients, projected_features
from icons_dagster.core.model.training import AdamMoments
from icons_dagster.core.model.loading import attach_new_lora, load_base_model, load_processor, resolve_placement, trainable_parameters
from icons_dagster.core.features.projection import make_projector
from icons_dagster.core.model.samples import SkipLog, encode_records


@pytest.fixture(scope="module")
def setup(tiny_model_dir, demo_records):
    config = ModelConfig(str(tiny_model_dir), max_length=512)
    placement = resolve_placement(config)
    processor = load_processor(config)
    base = load_base_model(config, placement)
    model = attach_new_lora(base, LoraSettings(r=4, alpha=8, dropout=0.1), seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # move off peft's B = 0 init so A's gradients are not all zero
        for _, param in trainable_parameters(model):
            param.add_(0.05 * torch.randn_like(param))
    model.eval()
    encoder = ConversationEncoder(processor, 512)
    return model, encoder, placement


def mixed_batch(encoder, records):
    """One batch mixing lengths, image and text-only, single- and multi-turn records."""
    picks = []
    for prefix in ("multi_turn", "text_only", "long_answer", "yes_no", "multiple_choice", "counting"):
        picks.append(next(r for r in records if r.id.startswith(prefix)))
    samples = list(encode_records(encoder, picks, SkipLog()))
    lengths = {s.input_ids.numel() for s in samples}
    assert len(samples) == 6 and len(lengths) >= 3, "the batch must really mix lengths (padding)"
    assert any(not s.image_inputs for s in samples) and any(s.image_inputs for s in samples)
    return samples


def test_batched_equals_batch1_loop_sgd(setup, demo_records):
    model, encoder, placement = setup
    samples = mixed_batch(encoder, demo_records)
    pad = encoder.tokenizer.pad_token_id
    with PerSampleGradients(model) as hooks:
        batched = hooks.full_gradients(collate(samples, pad), placement.device, placement.dtype)
    reference = loop_gradients(model, samples, pad, placement.device, placement.dtype)
    assert batched.shape == reference.shape
    assert hooks.dimension == reference.shape[1]
    # Every sample's gradient is non-trivial and matches the loop to float32 round-off.
    assert (reference.norm(dim=1) > 0).all()
    torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-6)


def test_batched_equals_loop_adam(setup, demo_records):
    model, encoder, placement = setup
    samples = mixed_batch(encoder, demo_records)
    pad = encoder.tokenizer.pad_token_id
    params = trainable_parameters(model)
    generator = torch.Generator().manual_seed(3)
    moments = AdamMoments(
        exp_avg={n: 1e-3 * torch.randn(p.shape, generator=generator) for n, p in params},
        exp_avg_sq={n: 1e-6 * torch.rand(p.shape, generator=generator) for n, p in params},
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
    )
    reference = loop_gradients(model, samples, pad, placement.device, placement.dtype)
    # LESS's formula applied by hand to the loop's flat gradients.
    m = torch.cat([moments.exp_avg[n].reshape(-1) for n, _ in params])
    v = torch.cat([moments.exp_avg_sq[n].reshape(-1) for n, _ in params])
    expected = (0.9 * m + 0.1 * reference) / ((0.999 * v + 0.001 * reference**2).sqrt() + 1e-8)
    identity = IdentityProjector(reference.shape[1])
    with PerSampleGradients(model) as hooks:
        features, _ = projected_features(hooks, collate(samples, pad), identity, placement.device, placement.dtype, moments)
    torch.testing.assert_close(features, expected, rtol=1e-3, atol=1e-4)
    # and the helper alone on one block
    name = params[0][0]
    block = reference[:, : params[0][1].numel()]
    torch.testing.assert_close(adam_precondition(block, moments, name), expected[:, : block.shape[1]])


class IdentityProjector:
    """No projection (d' = D), to compare features with flat gradients exactly."""

    def __init__(self, dim: int):
        self.dim = dim

    def project_block(self, block, offset, out):
        out[:, offset : offset + block.shape[1]] += block


def test_projected_features_agree_across_batch_sizes(setup, demo_records):
    model, encoder, placement = setup
    samples = list(encode_records(encoder, demo_records[:12], SkipLog()))
    pad = encoder.tokenizer.pad_token_id
    projector = make_projector("countsketch", 256, seed=7)
    results = []
    for size in (1, 5, 12):
        rows = []
        with PerSampleGradients(model) as hooks:
            for start in range(0, len(samples), size):
                batch = collate(samples[start : start + size], pad)
                rows.append(projected_features(hooks, batch, projector, placement.device, placement.dtype)[0])
        results.append(torch.cat(rows))
    # Stated tolerance: padding changes float32 summation order only.
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-4, atol=1e-6)


def test_projection_of_features_matches_projecting_full_gradient(setup, demo_records):
    model, encoder, placement = setup
    samples = list(encode_records(encoder, demo_records[:4], SkipLog()))
    pad = encoder.tokenizer.pad_token_id
    projector = make_projector("countsketch", 128, seed=3)
    with PerSampleGradients(model) as hooks:
        full = hooks.full_gradients(collate(samples, pad), placement.device, placement.dtype)
        features, _ = projected_features(hooks, collate(samples, pad), projector, placement.device, placement.dtype)
    expected = torch.zeros_like(features)
    projector.project_block(full, 0, expected)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-6)


def test_dropout_is_off_while_computing_gradients(setup, demo_records):
    model, encoder, placement = setup
    samples = list(encode_records(encoder, demo_records[:3], SkipLog()))
    pad = encoder.tokenizer.pad_token_id
    with PerSampleGradients(model) as hooks:
        first = hooks.full_gradients(collate(samples, pad), placement.device, placement.dtype)
        second = hooks.full_gradients(collate(samples, pad), placement.device, placement.dtype)
    assert np.array_equal(first.numpy(), second.numpy())


def test_lora_adapts_only_language_model_linears(setup):
    model, _, _ = setup
    adapted = {name.rsplit(".lora_", 1)[0] for name, _ in trainable_parameters(model)}
    assert adapted and all(".language_model." in name for name in adapted)
    assert not any(word in name for name in adapted for word in ("vision", "multi_modal_projector", "lm_head"))
    kinds = {name.rsplit(".", 1)[1] for name in adapted}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_each_module_gradient_is_handed_over_once_inside_the_backward(setup, demo_records):
    """Every LoRA module's per-sample gradient reaches the consumer exactly once, equal to the
    stored-gradient path, while the backward is still running (the last layers first), and
    nothing is left held afterwards."""
    model, encoder, placement = setup
    batch = collate(mixed_batch(encoder, demo_records), encoder.tokenizer.pad_token_id)
    with PerSampleGradients(model) as hooks:
        hooks.backward(batch, placement.device, placement.dtype)
        stored = {slot.name: block for slot, block in hooks.blocks(len(batch.ids))}
        seen: list[str] = []
        without_grad: list[int] = []  # LoRA weights the backward has not reached yet, per call

        def consume(slot, block):
            torch.testing.assert_close(block, stored[slot.name], rtol=1e-5, atol=1e-7)
            seen.append(slot.name)
            without_grad.append(sum(p.grad is None for _, p in trainable_parameters(model)))

        hooks.backward(batch, placement.device, placement.dtype, consume=consume)
        assert sorted(seen) == sorted(stored) and len(seen) == len(set(seen))
        layer = [int(name.split(".layers.")[1].split(".")[0]) for name in seen]
        assert layer[0] == max(layer) and layer[-1] == min(layer)  # backward order
        assert without_grad[0] > len(stored) // 2 and without_grad == sorted(without_grad, reverse=True)
        assert not hooks._inputs and not hooks._output_grads


def test_answer_logit_positions_and_the_loss_on_them():
    from icons_dagster.core.model.encoding import IGNORE_INDEX, answer_logit_positions, per_sample_loss

    x = IGNORE_INDEX
    labels = torch.tensor([[x, x, 5, 6, x, x], [x, 7, x, x, x, x]])
    # position t predicts token t + 1: row 0 needs t = 1, 2; row 1 needs t = 0
    assert answer_logit_positions(labels).tolist() == [0, 1, 2]
    assert answer_logit_positions(torch.full((2, 4), x)).tolist() == []
    logits = torch.randn(2, 6, 9, generator=torch.Generator().manual_seed(0))
    full = per_sample_loss(logits, labels)
    kept = per_sample_loss(logits[:, [0, 1, 2]], labels, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(kept, full, rtol=0, atol=1e-6)
    # by hand: row 1 is the cross-entropy of token 7 from the logits at position 0
    torch.testing.assert_close(full[1], -torch.log_softmax(logits[1, 0], dim=0)[7])


def test_vocabulary_head_only_at_answer_positions_gives_the_same_features(setup, demo_records):
    """The hooks ask the model for logits at answer positions only; the features and losses
    are those of the full head (which the batch-1 loop above also matches)."""
    model, encoder, placement = setup
    samples = mixed_batch(encoder, demo_records)
    batch = collate(samples, encoder.tokenizer.pad_token_id)
    projector = make_projector("countsketch", 256, seed=0)
    results = {}
    for answers_only in (True, False):
        with PerSampleGradients(model) as hooks:
            assert hooks._keeps_logits  # the tiny LLaVA's forward takes logits_to_keep
            hooks._keeps_logits = answers_only
            results[answers_only] = projected_features(hooks, batch, projector, placement.device, placement.dtype)
    (features, losses), (full_features, full_losses) = results[True], results[False]
    assert (full_features.norm(dim=1) > 0).all()
    torch.testing.assert_close(features, full_features, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses, full_losses, rtol=1e-6, atol=1e-7)
