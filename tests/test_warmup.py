"""Warm-up schedule, checkpoints and their learning-rate weights (LESS's checkpoint weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from icons_dagster.core.config import WarmupConfig
from icons_dagster.core.model.training import checkpoint_boundaries, checkpoint_weights, learning_rate_at, warmup_indices


def test_warmup_indices_are_seeded_sorted_and_sized():
    first = warmup_indices(1000, 0.05, seed=0)
    assert len(first) == 50 and np.all(np.diff(first) > 0)
    assert np.array_equal(first, warmup_indices(1000, 0.05, seed=0))
    assert not np.array_equal(first, warmup_indices(1000, 0.05, seed=1))
    assert len(warmup_indices(10, 0.05, seed=0)) == 1  # never empty
    assert len(warmup_indices(30, 0.1, seed=0)) == 3  # 0.1 * 30 is 3.0000000000000004 or 2.999...: floor must give 3


def test_learning_rate_schedule_known_values():
    config = WarmupConfig(learning_rate=1.0, warmup_ratio=0.1)
    total = 20  # 2 warm-up steps, then cosine over 18
    assert learning_rate_at(0, total, config) == pytest.approx(0.5)
    assert learning_rate_at(1, total, config) == pytest.approx(1.0)
    assert learning_rate_at(2, total, config) == pytest.approx(1.0)
    assert learning_rate_at(11, total, config) == pytest.approx(0.5)  # halfway through the cosine
    assert learning_rate_at(19, total, config) == pytest.approx(0.5 * (1 + math.cos(math.pi * 17 / 18)))


def test_checkpoint_boundaries_and_weights():
    assert checkpoint_boundaries(10, 1) == [10]
    assert checkpoint_boundaries(10, 3) == [4, 7, 10]
    with pytest.raises(ValueError, match="only 2 steps"):
        checkpoint_boundaries(2, 3)
    assert checkpoint_weights([2e-4, 1e-4, 1e-4]) == pytest.approx([0.5, 0.25, 0.25])
    with pytest.raises(ValueError):
        checkpoint_weights([0.0])


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="warmup ratio"):
        WarmupConfig(ratio=0)
