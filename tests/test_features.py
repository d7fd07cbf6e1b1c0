"""Length-grouped batching: less padding, the same features, rows in input order."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from icons_dagster.core.config import GradientConfig, LoraSettings, ModelConfig
from icons_dagster.core.model.encoding import ConversationEncoder
from icons_dagster.core.features.extraction import compute_features
from icons_dagster.core.model.loading import attach_new_lora, load_base_model, load_processor, resolve_placement, trainable_parameters
from icons_dagster.core.features.projection import make_projector
from icons_dagster.core.model.samples import SkipLog, encode_records, length_grouped_batches, padded_tokens


def test_each_window_is_sorted_longest_first_with_ties_in_input_order():
    items = list(enumerate([3, 1, 4, 1, 5, 9, 2, 6, 5]))  # (position, length)
    batches = list(length_grouped_batches(items, batch_size=2, window_batches=2, length=lambda item: item[1]))
    # windows [3 1 4 1] -> 4 3 1 1 (the two 1s keep their order), [5 9 2 6] -> 9 6 5 2, [5]
    assert batches == [[(2, 4), (0, 3)], [(1, 1), (3, 1)], [(5, 9), (7, 6)], [(4, 5), (6, 2)], [(8, 5)]]
    in_order = list(length_grouped_batches(items, batch_size=2, window_batches=1, length=lambda item: item[1]))
    assert in_order == [items[i : i + 2] for i in range(0, len(items), 2)]
    with pytest.raises(ValueError, match="window_batches"):
        list(length_grouped_batches(items, batch_size=2, window_batches=0, length=lambda item: item[1]))


def test_padded_tokens_is_the_longest_times_the_count():
    assert padded_tokens([3, 5, 2]) == 15 and padded_tokens([]) == 0
    lengths = [3, 1, 4, 1, 5, 9, 2, 6]
    in_order = sum(padded_tokens(lengths[i : i + 2]) for i in range(0, 8, 2))  # 3+3, 4+4, 9+9, 6+6
    grouped = sum(padded_tokens(b) for b in length_grouped_batches(lengths, 2, 4, length=int))  # 9 6 | 5 4 | 3 2 | 1 1
    assert (in_order, grouped) == (44, 18 + 10 + 6 + 2)


def test_the_default_config_groups_by_length_and_refuses_zero():
    assert GradientConfig().length_grouping == 16
    with pytest.raises(ValueError, match="length_grouping"):
        GradientConfig(length_grouping=0)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, demo_records):
    config = ModelConfig(str(tiny_model_dir), max_length=512)
    placement = resolve_placement(config)
    model = attach_new_lora(load_base_model(config, placement), LoraSettings(r=4, alpha=8), seed=0)
    torch.manual_seed(2)
    with torch.no_grad():
        for _, param in trainable_parameters(model):
            param.add_(0.05 * torch.randn_like(param))
    model.eval()
    encoder = ConversationEncoder(load_processor(config), 512)
    records = list(demo_records[:24])
    lengths = [s.input_ids.numel() for s in encode_records(encoder, records, SkipLog())]

    def features(length_grouping: int):
        opener = contextlib.nullcontext(model)
        projector = make_projector("countsketch", 128, 0)
        return compute_features(records, encoder, [lambda: opener], projector, placement, 4, length_grouping=length_grouping)

    return features, records, lengths


def test_length_grouping_keeps_rows_in_input_order_with_the_same_features(setup):
    features, records, lengths = setup
    plain, grouped = features(1), features(3)
    assert plain.ids == grouped.ids == [r.id for r in records][: len(plain.ids)]
    assert len(set(lengths)) > 3  # the demo records differ in length, so the grouping moves them
    np.testing.assert_array_equal(plain.n_tokens, lengths)
    np.testing.assert_array_equal(grouped.n_tokens, plain.n_tokens)
    np.testing.assert_array_equal(grouped.n_answer_tokens, plain.n_answer_tokens)
    # padding-aware per-sample gradients: another batch composition changes float round-off only
    np.testing.assert_allclose(grouped.features[0].astype(np.float32), plain.features[0].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(grouped.norms[0], plain.norms[0], rtol=1e-4)
    np.testing.assert_allclose(grouped.losses[0], plain.losses[0], rtol=1e-4)
    # the padded token positions, worked out from the lengths
    expected_plain = sum(padded_tokens(lengths[i : i + 4]) for i in range(0, len(lengths), 4))
    expected_grouped = sum(padded_tokens(b) for b in length_grouped_batches(lengths, 4, 3, length=int))
    assert (plain.padded_tokens, grouped.padded_tokens) == (expected_plain, expected_grouped)
    assert grouped.padded_tokens < plain.padded_tokens
    assert grouped.padding_share == pytest.approx(1 - sum(lengths) / expected_grouped)


def test_length_grouped_features_are_byte_identical_on_a_rerun(setup):
    features, _, _ = setup
    first, second = features(3), features(3)
    assert first.features[0].tobytes() == second.features[0].tobytes()
    assert first.losses[0].tobytes() == second.losses[0].tobytes()
