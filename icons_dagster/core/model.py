"""Loading a processor + image-text-to-text model and wrapping it in LoRA.

Checkpoints load through transformers' auto classes from a hub id or a local folder, so the
tiny demo model and LLaVA-1.5 take the same path. The warm-up adapter is loaded once onto
the base weights (never merged and wrapped again, which would take gradients at W + 2ΔW).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from icons_dagster.core.config import LoraSettings, ModelConfig

log = logging.getLogger(__name__)


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """Hide transformers' "Loading weights" / "Writing shards" bars (every load and save)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def resolve_placement(config: ModelConfig) -> Placement:
    """CUDA + bf16 when available, else CPU fp32 (unless the config says otherwise)."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    return Placement(device=device, dtype=dtype)


def load_processor(config: ModelConfig):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(
        config.name_or_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )


def load_base_model(config: ModelConfig, placement: Placement):
    """The frozen base model in eval mode on its device."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        config.name_or_path,
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        dtype=placement.dtype,
    )
    model.to(placement.device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def lora_target_names(model, target_regex: str) -> list[str]:
    """Module paths the LoRA regex selects; fails loudly when it selects nothing."""
    pattern = re.compile(target_regex)
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)]
    if not names:
        raise ValueError(f"LoRA target regex {target_regex!r} matches no Linear layer of {type(model).__name__}")
    return names


def attach_new_lora(model, settings: LoraSettings, seed: int):
    """A fresh trainable adapter (peft initializes B to zero, A from the seeded RNG)."""
    from peft import LoraConfig, get_peft_model

    lora_target_names(model, settings.target_modules)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
    )
    return get_peft_model(model, config)


def load_lora(model, adapter_dir: str | Path):
    """The saved adapter on the base weights, trainable so its parameters take gradients."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    peft_model.eval()  # dropout off while computing gradients
    return peft_model


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """LoRA parameters in a fixed order: the order of the concatenated gradient vector."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
