"""LoRA warm-up on a seeded random share of the pool (paper §2.3 step 1, LESS).

AdamW with a linear warm-up then cosine decay. Checkpoints are evenly spaced over the
steps; each keeps the adapter (peft ``save_pretrained``, safetensors), the Adam moments
(safetensors) for Adam-preconditioned features, and the mean learning rate over its
stretch of steps, which becomes its weight in the influence sum (normalized to 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from icons_dagster.core.config import WarmupConfig
from icons_dagster.core.model.encoding import ConversationEncoder, collate, per_sample_loss
from icons_dagster.core.model.loading import Placement, trainable_parameters
from icons_dagster.core.data.records import Record
from icons_dagster.core.model.samples import SkipLog, encode_records
from icons_dagster.core.storage.artifacts import write_json


@dataclass(frozen=True)
class AdamMoments:
    """The warm-up optimizer's state at a checkpoint, by parameter name."""

    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    beta1: float
    beta2: float
    eps: float


MOMENTS_FILE = "adam_moments.safetensors"
CHECKPOINT_FILE = "checkpoint.json"


def warmup_indices(n: int, ratio: float, seed: int) -> np.ndarray:
    """Sorted positions of the seeded random ``floor(ratio * n)`` (at least 1) warm-up records."""
    size = max(1, math.floor(ratio * n + 1e-9))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False))


def checkpoint_boundaries(total_steps: int, num_checkpoints: int) -> list[int]:
    """Step counts after which checkpoints are saved, evenly spaced, the last at ``total_steps``."""
    if num_checkpoints > total_steps:
        raise ValueError(f"{num_checkpoints} checkpoints requested but the warm-up has only {total_steps} steps")
    return [math.ceil(total_steps * (c + 1) / num_checkpoints) for c in range(num_checkpoints)]


def learning_rate_at(step: int, total_steps: int, config: WarmupConfig) -> float:
    """LR used for optimizer step ``step`` (0-based): linear warm-up, then cosine to zero."""
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    if step < warmup_steps:
        return config.learning_rate * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class CheckpointInfo:
    index: int
    step: int
    mean_learning_rate: float
    directory: Path


def train_warmup(
    model,
    encoder: ConversationEncoder,
    records: Sequence[Record],
    config: WarmupConfig,
    placement: Placement,
    out_dir: Path,
    skips: SkipLog,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[CheckpointInfo]:
    """Train the (fresh) adapter of ``model`` on ``records``; write checkpoints under ``out_dir``."""
    params = trainable_parameters(model)
    steps_per_epoch = math.ceil(len(records) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    boundaries = checkpoint_boundaries(total_steps, config.num_checkpoints)
    optimizer = torch.optim.AdamW(
        [p for _, p in params],
        lr=config.learning_rate,
        betas=config.adam_betas,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    generator = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    model.train()
    pad_id = encoder.tokenizer.pad_token_id
    step = 0
    stretch_lrs: list[float] = []
    checkpoints: list[CheckpointInfo] = []
    for epoch in range(config.epochs):
        order = generator.permutation(len(records))
        epoch_skips = SkipLog() if epoch else skips  # report each skipped record once
        for start in range(0, len(order), config.batch_size):
            chunk = [records[i] for i in order[start : start + config.batch_size]]
            samples = list(encode_records(encoder, chunk, epoch_skips))
            lr = learning_rate_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_value = float("nan")
            if samples:
                batch = collate(samples, pad_id)
                with placement.forward_context():
                    outputs = model(**batch.model_inputs(placement.device, placement.dtype))
                    # Token-mean over the batch, as HF's loss in LLaVA's training script.
                    losses = per_sample_loss(outputs.logits, batch.labels)
                weights = (batch.labels[:, 1:] != -100).sum(dim=1).to(losses)
                loss = (losses * weights).sum() / weights.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_value = float(loss.detach())
            stretch_lrs.append(lr)
            step += 1
            if progress is not None:
                progress(step, total_steps, loss_value)
            if step in boundaries:
                index = len(checkpoints)
                directory = out_dir / f"checkpoint-{index}"
                save_checkpoint(model, optimizer, params, directory, index, step, float(np.mean(stretch_lrs)), config)
                checkpoints.append(CheckpointInfo(index, step, float(np.mean(stretch_lrs)), directory))
                stretch_lrs = []
    model.eval()
    return checkpoints


def save_checkpoint(model, optimizer, params, directory: Path, index: int, step: int, mean_lr: float, config: WarmupConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory / "adapter"))
    tensors = {}
    for name, param in params:
        state = optimizer.state.get(param, {})
        zeros = torch.zeros_like(param, dtype=torch.float32)
        tensors[f"exp_avg/{name}"] = state.get("exp_avg", zeros).detach().float().cpu().contiguous()
        tensors[f"exp_avg_sq/{name}"] = state.get("exp_avg_sq", zeros).detach().float().cpu().contiguous()
    save_file(tensors, str(directory / MOMENTS_FILE))
    write_json(
        directory / CHECKPOINT_FILE,
        {
            "index": index,
            "step": step,
            "mean_learning_rate": mean_lr,
            "adam_betas": list(config.adam_betas),
            "adam_eps": config.adam_eps,
        },
    )


def load_moments(directory: Path, eps: float) -> AdamMoments:
    """Adam moments saved with a checkpoint, keyed by the adapter's parameter names."""
    import json

    meta = json.loads((directory / CHECKPOINT_FILE).read_text(encoding="utf-8"))
    tensors = load_file(str(directory / MOMENTS_FILE))
    exp_avg = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("exp_avg/")}
    exp_avg_sq = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("exp_avg_sq/")}
    beta1, beta2 = meta["adam_betas"]
    return AdamMoments(exp_avg, exp_avg_sq, float(beta1), float(beta2), eps)


def checkpoint_weights(mean_learning_rates: Sequence[float]) -> list[float]:
    """LESS's checkpoint weights: mean learning rates normalized to sum to 1."""
    total = float(sum(mean_learning_rates))
    if total <= 0:
        raise ValueError("checkpoint learning rates must sum to a positive value")
    return [float(lr) / total for lr in mean_learning_rates]
