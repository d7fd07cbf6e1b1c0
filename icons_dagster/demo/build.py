"""The embedded default: the tiny LLaVA model built once under the store's demo folder."""

from __future__ import annotations

from pathlib import Path

from icons_dagster.demo.data import demo_corpus
from icons_dagster.demo.tiny_model import build_tiny_llava

DEMO_MODEL_DIR = "tiny-llava"


def ensure_demo_model(demo_dir: Path) -> Path:
    """Build (or reuse) the tiny model; it reloads through from_pretrained like a real one."""
    return Path(build_tiny_llava(Path(demo_dir) / DEMO_MODEL_DIR, demo_corpus("default")))
