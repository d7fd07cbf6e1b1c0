"""Shared fixtures: the test-size demo data and the tiny model, built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def demo_paths(tmp_path_factory):
    from icons_dagster.demo.data import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo") / "data", size="test")


@pytest.fixture(scope="session")
def tiny_model_dir():
    from graph_helpers import tiny_model

    return tiny_model()


@pytest.fixture(scope="session")
def demo_records(demo_paths):
    from icons_dagster.core.data.records import load_records

    loaded = load_records(demo_paths.pool, demo_paths.image_root)
    assert not loaded.problems
    return loaded.records
