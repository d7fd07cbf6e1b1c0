"""The one Definitions object: assets, resources, jobs, the benchmark sensor and automation.

Configuration comes from the home's ``icons.json`` (written by the CLI), so the UI and the
CLI agree; without one, the embedded demo runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dagster import Definitions, in_process_executor

from icons_dagster.assets import ICONS_ASSETS
from icons_dagster.assets.evaluation import EVALUATION_ASSETS
from icons_dagster.assets.ofa import OFA_ASSETS
from icons_dagster.automation import DEFAULT_VOTE_CRON, benchmark_folder_sensor, icons_automation_sensor, vote_job, vote_schedule
from icons_dagster.registration import explain_sample_job, register_benchmarks_job
from icons_dagster.scaleout import shard_job_from_config
from icons_dagster.core.fingerprint import ALGORITHM_VERSION, fingerprint
from icons_dagster.partitions import train_shard_partitions
from icons_dagster.resources import DataResource, EvaluationResource, ModelResource, OFAResource, SettingsResource, StoreResource
from icons_dagster.resources.home import CONFIG_FILE, STORE_URL_ENV, read_home_config, resolve_home
from icons_dagster.resources.refs import ArtifactRefIOManager


def build_resources(home: Path, config: dict[str, Any]) -> dict[str, Any]:
    # the shared store: icons.json "store": {"remote": URL}, or ICONS_STORE_URL
    remote = config.get("store", {}).get("remote") or os.environ.get(STORE_URL_ENV, "")
    return {
        "store": StoreResource(root=str(home), remote=remote),
        "data": DataResource(**config.get("data", {})),
        "model": ModelResource(**config.get("model", {})),
        "settings": SettingsResource(**config.get("settings", {})),
        "ofa": OFAResource(**config.get("ofa", {})),
        "evaluation": EvaluationResource(**config.get("evaluation", {})),
        "refs_io_manager": ArtifactRefIOManager(root=str(home), remote=remote),
    }


# The settings each asset's output depends on directly (its inputs' versions cover the rest).
_SETTINGS_OF = {
    "training_pool": ("data:pool", "data:image_root", "data:demo_size", "num_shards"),
    "warmup_subset": ("settings:warmup_ratio", "settings:warmup_seed"),
    "warmup_checkpoint": ("model:*", "settings:learning_rate", "settings:epochs", "settings:num_checkpoints", "settings:warmup_batch_size"),
    "training_gradients": ("settings:projector", "settings:projection_dim", "settings:projection_seed", "settings:train_gradient", "settings:gradient_batch_size", "settings:gradient_length_grouping"),
    "validation_gradients": ("data:benchmarks", "settings:projector", "settings:projection_dim", "settings:projection_seed", "settings:gradient_batch_size", "settings:gradient_length_grouping"),
    "task_influence": ("settings:p", "settings:write_influence_matrix"),
    "vote_table": ("settings:p", "settings:aggregation", "settings:task_weights", "settings:tiebreak", "settings:coverage"),
    "selected_subset": ("settings:p", "settings:aggregation", "settings:task_weights", "settings:tiebreak", "settings:coverage"),
    "ofa_embeddings": ("ofa:embedder", "ofa:embedder_model", "ofa:embedder_revision", "ofa:embedder_text", "ofa:embedder_image_weight"),
    "ofa_pseudo_labels": ("ofa:num_clusters", "ofa:kmeans_iterations", "ofa:kmeans_seed", "ofa:selector"),
    "ofa_selector": ("ofa:num_clusters", "ofa:hidden_dim", "ofa:epochs", "ofa:min_steps", "ofa:batch_size", "ofa:learning_rate", "ofa:train_seed", "ofa:selector"),
    "ofa_selected_subset": ("ofa:confidence", "ofa:p"),
    "evaluation_subsets": ("settings:p", "evaluation:methods"),
    "finetuned_adapter": ("model:*", "evaluation:learning_rate", "evaluation:epochs", "evaluation:batch_size", "evaluation:seed", "evaluation:equal_steps", "evaluation:lora_r", "evaluation:lora_alpha"),
    "benchmark_scores": ("data:benchmarks", "evaluation:max_new_tokens"),
    "evaluation_table": ("evaluation:methods",),
}


def asset_code_versions(resources: dict[str, Any], num_shards: int) -> dict[str, str]:
    """Code version of each asset = fingerprint of the settings it depends on, so the UI marks
    exactly the assets a config change affects (and their downstream) as stale."""
    values = {f"{section}:{k}": v for section in ("data", "model", "settings", "ofa", "evaluation") for k, v in resources[section].model_dump().items()}
    values["num_shards"] = num_shards
    versions = {}
    for asset, keys in _SETTINGS_OF.items():
        picked = {}
        for key in keys:
            if key.endswith(":*"):
                picked.update({k: v for k, v in values.items() if k.startswith(key[:-1])})
            else:
                picked[key] = values[key]
        versions[asset] = f"{ALGORITHM_VERSION}-{fingerprint(asset, **picked)}"
    return versions


def versioned_assets(resources: dict[str, Any], num_shards: int) -> list:
    versions = asset_code_versions(resources, num_shards)
    return [a.map_asset_specs(lambda spec: spec.replace_attributes(code_version=versions[spec.key.to_user_string()])) for a in [*ICONS_ASSETS, *OFA_ASSETS, *EVALUATION_ASSETS]]


def build_definitions(home: str | Path | None = None, config: dict[str, Any] | None = None) -> Definitions:
    """Definitions for one home; ``config`` defaults to the home's icons.json (or the demo)."""
    home_path = resolve_home(home)
    settings = config if config is not None else read_home_config(home_path)
    resources = build_resources(home_path, settings)
    return Definitions(
        assets=versioned_assets(resources, len(train_shard_partitions.get_partition_keys())),
        jobs=[
            register_benchmarks_job,
            explain_sample_job,
            vote_job,
            shard_job_from_config(settings.get("scaleout", {}), str(home_path / CONFIG_FILE)),
        ],
        sensors=[benchmark_folder_sensor, icons_automation_sensor],
        schedules=[vote_schedule(settings.get("automation", {}).get("vote_cron", DEFAULT_VOTE_CRON))],
        resources=resources,
        # A subprocess per step would re-import torch and reload the model for every step.
        executor=in_process_executor,
    )


defs = build_definitions()
