"""What each stage's output depends on in the configuration: the assets' code versions.

Each entry is the configuration part of that stage's fingerprint (the rest of the
fingerprint is its inputs' fingerprints and the data's content), so the UI marks exactly
the assets a changed setting affects, and their downstream, as stale. The stages build
their fingerprints from the same helpers; two entries use the configuration where the
stage uses what it resolves to: ofa_embeddings (the embedder's settings, not the
loaded embedder's identity, which would load its weights) and finetuned_adapter (the
recipe's settings, not the per-subset epochs they give).
"""

from __future__ import annotations

from typing import Any

from icons_dagster.core.stages.icons import (
    gradient_fingerprint_fields,
    influence_settings,
    model_fingerprint_fields,
    pool_settings,
    subset_settings,
    warmup_checkpoint_settings,
    warmup_subset_settings,
)
from icons_dagster.core.config import image_limit_fields
from icons_dagster.core.stages.evaluation import scores_settings, subsets_settings, table_settings
from icons_dagster.core.stages.visual_dependency import visual_dependency_settings
from icons_dagster.core.schema import IconsConfig, section_to_json


def stage_settings(config: IconsConfig) -> dict[str, dict[str, Any]]:
    """Asset name -> the settings its fingerprint takes (see the module docstring)."""
    data, ofa, evaluation = config.data, config.ofa, config.evaluation
    embedder = {k: v for k, v in section_to_json(config.embedder).items() if k not in ("batch_size", "device")}
    return {
        "training_pool": pool_settings(data.num_shards, data.max_image_pixels),
        "warmup_subset": warmup_subset_settings(config.warmup),
        "warmup_checkpoint": warmup_checkpoint_settings(config.model, config.lora, config.warmup),
        "training_gradients": {"gradients": gradient_fingerprint_fields(config.gradients, config.gradients.train_gradient)},
        "validation_gradients": {"gradients": gradient_fingerprint_fields(config.gradients, "sgd"), **image_limit_fields(data.max_image_pixels)},
        "task_influence": influence_settings(config.selection.p, config.influence.write_matrix),
        "vote_table": {"selection": config.selection},
        "selected_subset": subset_settings(config.selection),
        "ofa_embeddings": {"embedder": embedder},
        "ofa_pseudo_labels": {"kmeans": ofa.kmeans_fields(), "imported": ofa.selector},
        "ofa_selector": {"training": ofa.selector_fields(), "imported": ofa.selector, "embedder": embedder},
        "ofa_selected_subset": ofa.subset_fields(),
        "visual_dependency": visual_dependency_settings(config.gradients),
        "evaluation_subsets": {**subsets_settings(evaluation, config.selection.p), **image_limit_fields(data.max_image_pixels)},
        "finetuned_adapter": {
            "model": model_fingerprint_fields(config.model),
            "lora": evaluation.lora_for(config.lora),
            "recipe": {k: getattr(evaluation, k) for k in ("learning_rate", "epochs", "batch_size", "seed", "equal_steps")},
        },
        "benchmark_scores": {**scores_settings(evaluation), **image_limit_fields(data.max_image_pixels)},
        "evaluation_table": {"methods": list(evaluation.compared), **table_settings(evaluation)},
    }
