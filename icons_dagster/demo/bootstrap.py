"""The embedded demo as a bootstrap: build its inputs, then write a plain configuration.

``icons-dagster demo`` (and ``evaluate`` on an empty home) call ``bootstrap_demo``: it
generates the demo pool and benchmarks and builds the tiny LLaVA after stage-1 alignment
under ``<home>/demo`` (once; reruns reuse them), and returns an ``IconsConfig`` with their
real paths and the demo's settings. From there on the graph sees an ordinary pool,
benchmarks folder and checkpoint: nothing outside ``demo/`` knows it is a demo.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from icons_dagster.core.schema import IconsConfig
from icons_dagster.core.storage.artifacts import ArtifactStore

# The demo's tiny model and pool: LoRA small enough to train in seconds, a projection
# dimension well below the gradient dimension (16,384 for r=8) so projection is exercised.
# The warm-up takes 20% (paper ablation: 5-20% all work) because 5% of a 720-record pool is
# only 36 records, too few for the tiny model to learn the answer formats.
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "model": {"max_length": 512},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
    "warmup": {"ratio": 0.2, "learning_rate": 1e-3, "batch_size": 4},
    "gradients": {"dim": 1024, "batch_size": 16},
    # OFA on 720 records: a dozen clusters (6 task families, multi-turn, text-only, and
    # the image sources within families) and a small selector. The pixel "image tower"
    # knows no semantics, so it gets 20% of the joint embedding (see core/ofa/embedding.py).
    "embedder": {"image_weight": 0.2},
    "ofa": {"num_clusters": 12, "hidden_dim": 64, "batch_size": 32},
    # The evaluation's fine-tune: LoRA r=8 at lr 2e-4 for one epoch (the paper's recipe on a
    # 7B model) teaches the tiny model nothing; r=64 at 2e-3 for 5 epochs on the full data
    # reached counting 0.45 and vqa_short 0.68 (measured; yes/no and multiple choice still
    # collapse to one answer).
    "evaluation": {"lora_r": 64, "lora_alpha": 128, "learning_rate": 2e-3, "epochs": 5, "batch_size": 8},
}

# Stage-1 alignment steps of the demo model per demo size (the test size: ~12 s, else ~70 s).
STAGE1_STEPS = {"test": 200}
DEFAULT_STAGE1_STEPS = 1200

# The mix world (docs/preregistration-mix.md) differs from the demo's settings in one place:
# the paper's 5% warm-up (150 of its 3,000 records; the demo's 20% was for its 720).
MIX_SETTINGS: dict[str, dict[str, Any]] = {"warmup": {"ratio": 0.05}}


def demo_settings(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The demo's settings as a config document, with ``sections`` merged over them."""
    document = copy.deepcopy(DEMO_SETTINGS)
    for name, values in sections.items():
        document.setdefault(name, {}).update(values)
    return document


def stage1_records(steps: int) -> int:
    """About five passes over the captions, 500 to 4,000 of them."""
    return min(4000, max(500, steps * 16 // 5))


def bootstrap_demo(
    home: str | Path,
    size: str = "default",
    num_shards: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    world_seed: int = 0,
) -> IconsConfig:
    """Build the demo inputs under ``<home>/demo`` and return their configuration.

    ``world_seed`` draws another world of the same size (and, for the mix world, its own base
    model: tokenizer and captions follow the world), for confirming a result on fresh data.
    """
    from icons_dagster.demo.data import DEMO_SIZES, generate_demo
    from icons_dagster.demo.mix import MIX_SIZES, generate_mix
    from icons_dagster.demo.stage1 import ensure_mix_model, ensure_stage1_model

    demo_dir = ArtifactStore(home).demo_dir
    suffix = f"-seed{world_seed}" if world_seed else ""
    if size in MIX_SIZES:
        demo = generate_mix(demo_dir / f"data-{size}{suffix}", size=size, seed=world_seed)
        model = ensure_mix_model(demo_dir, size, progress=progress, world_seed=world_seed)
        overrides = MIX_SETTINGS
    elif size in DEMO_SIZES:
        demo = generate_demo(demo_dir / f"data-{size}{suffix}", size=size, seed=world_seed)
        steps = STAGE1_STEPS.get(size, DEFAULT_STAGE1_STEPS)
        model = ensure_stage1_model(demo_dir, steps, stage1_records(steps), progress=progress)
        overrides = {}
    else:
        raise ValueError(f"unknown demo size {size!r}; choose one of {demo_sizes()}")
    data = {"pool": str(demo.pool), "image_root": str(demo.image_root), "benchmarks": str(demo.benchmarks)}
    if num_shards:
        data["num_shards"] = num_shards
    document = demo_settings(data=data, model={"name_or_path": str(model)}, **overrides)
    return IconsConfig.from_json(document, "the demo's settings")


def demo_sizes() -> list[str]:
    """Every world ``demo`` and ``evaluate`` can build: the demo's sizes and the mix world's."""
    from icons_dagster.demo.data import DEMO_SIZES
    from icons_dagster.demo.mix import MIX_SIZES

    return [*DEMO_SIZES, *MIX_SIZES]
