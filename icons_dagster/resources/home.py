"""The store root ("home") and its config file, shared by the CLI, the UI and the sensor.

``icons.json`` under the home holds the resource fields (data, model, settings) and the
shard count. The CLI writes it; ``definitions.py`` reads it, so ``dagster dev`` pointed at
the same home (``ICONS_HOME``) sees the same configuration, runs and artifacts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from icons_dagster.core.store import write_json

HOME_ENV = "ICONS_HOME"
STORE_URL_ENV = "ICONS_STORE_URL"  # fsspec URL of a store shared by many machines
DEFAULT_HOME = ".icons_home"
CONFIG_FILE = "icons.json"
DEFAULT_NUM_SHARDS = 4

# The demo's tiny model and pool: LoRA small enough to train in seconds, a projection
# dimension well below the gradient dimension (16,384 for r=8) so projection is exercised.
# The warm-up takes 20% (paper ablation: 5-20% all work) because 5% of a 720-record pool is
# only 36 records, too few for the tiny model to learn the answer formats.
DEMO_PRESET: dict[str, Any] = {
    "data": {"demo_size": "default"},
    # The tiny LLaVA after 1,200 steps of stage-1 captioning (~70 s once; demo/stage1.py).
    "model": {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "max_length": 512, "demo_stage1_steps": 1200},
    "settings": {
        "warmup_ratio": 0.2,
        "learning_rate": 1e-3,
        "projection_dim": 1024,
        "gradient_batch_size": 16,
        "warmup_batch_size": 4,
    },
    # OFA on 720 records: a dozen clusters (6 task families, multi-turn, text-only, and
    # the image sources within families) and a small selector. The pixel "image tower"
    # knows no semantics, so it gets 20% of the joint embedding (see core/embedding.py).
    "ofa": {"num_clusters": 12, "hidden_dim": 64, "batch_size": 32, "embedder_image_weight": 0.2},
    # The evaluation's fine-tune: LoRA r=8 at lr 2e-4 for one epoch (the paper's recipe on a
    # 7B model) teaches the tiny model nothing; r=64 at 2e-3 for 5 epochs on the full data
    # reached counting 0.45 and vqa_short 0.68 (measured; yes/no and multiple choice still
    # collapse to one answer).
    "evaluation": {"lora_r": 64, "lora_alpha": 128, "learning_rate": 2e-3, "epochs": 5, "batch_size": 8},
    "num_shards": DEFAULT_NUM_SHARDS,
}


def resolve_home(home: str | Path | None = None) -> Path:
    value = home or os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(value).expanduser().resolve()


def read_home_config(home: Path) -> dict[str, Any]:
    """The saved config, or the demo preset when the home has none yet."""
    path = Path(home) / CONFIG_FILE
    if not path.is_file():
        return json.loads(json.dumps(DEMO_PRESET))
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON ({error})") from error
    unknown = sorted(set(config) - {"data", "model", "settings", "ofa", "evaluation", "num_shards", "automation", "scaleout", "store"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}")
    return config


def write_home_config(home: Path, config: dict[str, Any]) -> Path:
    Path(home).mkdir(parents=True, exist_ok=True)
    path = Path(home) / CONFIG_FILE
    write_json(path, config)
    return path


def num_shards_from_environment() -> int:
    """Shard count fixed before any definition is built: env, else the home config, else 4."""
    if os.environ.get("ICONS_NUM_SHARDS"):
        return int(os.environ["ICONS_NUM_SHARDS"])
    return int(read_home_config(resolve_home()).get("num_shards", DEFAULT_NUM_SHARDS))
