"""The store root ("home") and its ``icons.json``, shared by the CLI, the UI and the sensors.

``icons.json`` is ``IconsConfig.to_json()``: every section, every field. The CLI writes
it; ``definitions.py`` reads it, so ``dagster dev`` pointed at the same home
(``ICONS_HOME``) sees the same configuration, runs and artifacts. A file written by an
older icons-dagster (sections data/model/settings/ofa/evaluation and a top-level
num_shards) is read through ``LEGACY_FIELDS`` and rewritten in today's form.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from icons_dagster.core.schema import IconsConfig, read_config_document
from icons_dagster.core.storage.artifacts import ArtifactStore, write_json

HOME_ENV = "ICONS_HOME"
STORE_URL_ENV = "ICONS_STORE_URL"  # fsspec URL of a store shared by many machines
DEFAULT_HOME = ".icons_home"

# Where each setting of the old layout lives now ("section:field" -> "section.field"; None: gone).
LEGACY_FIELDS = {
    "model:lora_r": "lora.r",
    "model:lora_alpha": "lora.alpha",
    "model:lora_dropout": "lora.dropout",
    "model:lora_target_modules": "lora.target_modules",
    "settings:warmup_ratio": "warmup.ratio",
    "settings:warmup_seed": "warmup.seed",
    "settings:learning_rate": "warmup.learning_rate",
    "settings:epochs": "warmup.epochs",
    "settings:num_checkpoints": "warmup.num_checkpoints",
    "settings:warmup_batch_size": "warmup.batch_size",
    "settings:projector": "gradients.projector",
    "settings:projection_dim": "gradients.dim",
    "settings:projection_seed": "gradients.seed",
    "settings:train_gradient": "gradients.train_gradient",
    "settings:gradient_batch_size": "gradients.batch_size",
    "settings:gradient_length_grouping": "gradients.length_grouping",
    "settings:p": "selection.p",
    "settings:aggregation": "selection.method",
    "settings:task_weights": "selection.task_weights",
    "settings:tiebreak": "selection.tiebreak",
    "settings:coverage": "selection.coverage",
    "settings:write_influence_matrix": "influence.write_matrix",
    "ofa:embedder": "embedder.kind",
    "ofa:embedder_model": "embedder.name_or_path",
    "ofa:embedder_revision": "embedder.revision",
    "ofa:embedder_text": "embedder.text",
    "ofa:embedder_image_weight": "embedder.image_weight",
    "ofa:embedder_batch_size": "embedder.batch_size",
    "ofa:embedder_device": "embedder.device",
    "ofa:trust_remote_code": "embedder.trust_remote_code",
    # the demo is a bootstrap (``icons-dagster demo`` writes real paths): dropped
    "data:demo_size": None,
    "model:demo_stage1_steps": None,
}


def resolve_home(home: str | Path | None = None) -> Path:
    value = home or os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(value).expanduser().resolve()


def config_file(home: Path) -> Path:
    return ArtifactStore(home).config_file


def upgrade_legacy(document: dict[str, Any]) -> dict[str, Any]:
    """Today's sections from the old layout (unchanged when it already is today's)."""
    old = "settings" in document or "num_shards" in document or any(
        f"{section}:{key}" in LEGACY_FIELDS for section, values in document.items() if isinstance(values, dict) for key in values
    )
    if not old:
        return document
    upgraded: dict[str, dict[str, Any]] = {}
    for section, values in document.items():
        if section == "num_shards":
            upgraded.setdefault("data", {})["num_shards"] = values
            continue
        for key, value in values.items():
            target = LEGACY_FIELDS.get(f"{section}:{key}", f"{section}.{key}")
            if target is None:
                continue
            new_section, new_key = target.split(".", 1)
            upgraded.setdefault(new_section, {})[new_key] = value
    return upgraded


def read_home_config(home: Path) -> IconsConfig:
    """The home's configuration; the defaults (nothing to select from yet) when it has none."""
    path = config_file(home)
    if not path.is_file():
        return IconsConfig()
    document = read_config_document(path)
    upgraded = upgrade_legacy(document)
    config = IconsConfig.from_json(upgraded, str(path))
    if upgraded is not document:
        write_home_config(home, config)
    return config


def write_home_config(home: Path, config: IconsConfig) -> Path:
    path = config_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, config.to_json())
    return path
