"""Loading a processor + model and wrapping it in LoRA.

Checkpoints load through transformers' auto classes from a hub id or a local folder, so the
tiny demo model, LLaVA-1.5, Qwen2.5-VL and Idefics3 / SmolVLM take the same path
(``AutoModelForImageTextToText``); a checkpoint whose type has no image-text-to-text class
is a text-only causal LM (``AutoModelForCausalLM``, LESS's setting). The warm-up adapter is
loaded once onto the base weights (never merged and wrapped again, which would take
gradients at W + 2ΔW).

LoRA targets: ``"auto"`` resolves, per architecture, to the Linear layers inside the model's
language model (``get_decoder()``): never the vision tower, the projector or lm_head, however
the architecture names them.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from icons_dagster.core.config import AUTO_LORA_TARGET, LoraSettings, ModelConfig
from icons_dagster.core.model.devices import LEASE_DEVICE, lease_device

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
    autocast: torch.dtype | None = None  # mixed-precision dtype of forward passes, None = off
    gradient_checkpointing: bool = False

    def forward_context(self):
        """Autocast for a forward pass (backward passes run outside it, as torch advises)."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)


def resolve_placement(config: ModelConfig) -> Placement:
    """CUDA + bf16 (weights and autocast) when available, else CPU fp32 (unless the config says otherwise)."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif config.device == LEASE_DEVICE:  # one GPU per run process on a multi-GPU machine
        device = torch.device("cuda", lease_device(torch.cuda.device_count()))
    else:
        device = torch.device(config.device)
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    if config.autocast == "auto":
        autocast = torch.bfloat16 if device.type == "cuda" else None
    else:
        autocast = None if config.autocast == "off" else getattr(torch, config.autocast)
    if device.type == "cuda" and config.deterministic:
        use_deterministic_cuda()
    return Placement(device=device, dtype=dtype, autocast=autocast, gradient_checkpointing=config.gradient_checkpointing)


def use_deterministic_cuda() -> None:
    """Deterministic CUDA kernels for this process (standard: a rerun gives the same bytes).

    CountSketch's ``index_add_`` and several backward kernels add floats with atomics on
    CUDA, in an order that changes per run; torch has ordered versions of them when asked.
    cuBLAS needs a fixed workspace for the same, set before its first call (run processes
    load the model before any matmul). Kernels with no ordered version warn, naming
    themselves, rather than stop a run.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if not torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


@contextmanager
def scoring_mode(model) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd, for losses and likelihoods that train nothing;
    the caller's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def keeps_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (the vocabulary head run only at
    the positions a loss reads); a peft wrapper is looked through."""
    forward = getattr(model, "get_base_model", lambda: model)().forward
    return "logits_to_keep" in inspect.signature(forward).parameters


@contextmanager
def gradient_mode(model, placement: Placement) -> Iterator[None]:
    """The mode per-sample gradients are taken in: eval (no dropout); with gradient
    checkpointing, train mode (transformers checkpoints only in training) with every dropout
    module in eval, so the same function is differentiated. The caller's mode is restored."""
    if not placement.gradient_checkpointing:
        yield
        return
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_model_source(name_or_path: str) -> None:
    """Refuse a folder path that does not exist before transformers reads it as a hub id
    (its error then speaks of repo-id syntax). Hub ids are ``name`` or ``org/name``."""
    if not name_or_path:
        raise ValueError(
            "no model configured (model.name_or_path): run `icons-dagster demo` (the embedded tiny model) or pass --model"
        )
    looks_like_path = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r}: no such checkpoint folder (model.name_or_path must be a local "
            "folder with config.json and weights, or a hub id 'org/name')"
        )


def load_processor(config: ModelConfig):
    """The checkpoint's processor; for a processor that cannot load its video part (see
    ``processor_without_video``), the same processor class without it."""
    from transformers import AutoProcessor

    check_model_source(config.name_or_path)
    kwargs = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
    try:
        return AutoProcessor.from_pretrained(config.name_or_path, **kwargs)
    except (OSError, ImportError, ValueError, AttributeError) as error:
        processor = _load_processor_without_video(config.name_or_path, kwargs)
        if processor is None:
            raise
        log.warning("%s: loaded %s without its video processor (%s); ICONS feeds images only", config.name_or_path, type(processor).__name__, error)
        return processor


def processor_without_video(processor_class: type) -> type:
    """``processor_class`` minus its video processor, under the same name.

    Why: transformers 5's Qwen-VL processors refuse to build without a video processor,
    and video processors need torchvision, which a CPU machine (this project's CI) or a
    checkpoint without a video config may lack. ICONS records hold images only, so the
    image path (the class's own token expansion, M-RoPE inputs) is all it needs.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    return type(processor_class.__name__, (processor_class,), {"__init__": __init__, "__doc__": processor_without_video.__doc__})


def _load_processor_without_video(name_or_path: str, kwargs: dict):
    """Image processor + tokenizer (and its chat template) in the checkpoint's processor
    class without video; None when that class has no video processor to leave out."""
    import inspect

    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(name_or_path, **kwargs).model_type
    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type) or "", None)
    if processor_class is None or "video_processor" not in inspect.signature(processor_class.__init__).parameters:
        return None
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
    return processor_without_video(processor_class)(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def _auto_model_class(config: ModelConfig):
    """Image-text-to-text when the checkpoint's type has such a class, else a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    check_model_source(config.name_or_path)
    hf_config = AutoConfig.from_pretrained(config.name_or_path, revision=config.revision, trust_remote_code=config.trust_remote_code)
    remote = getattr(hf_config, "auto_map", None) or {}
    if hf_config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or "AutoModelForImageTextToText" in remote:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def load_base_model(config: ModelConfig, placement: Placement):
    """The frozen base model in eval mode on its device."""
    model = _auto_model_class(config).from_pretrained(
        config.name_or_path,
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        dtype=placement.dtype,
    )
    model.to(placement.device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if placement.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def language_model_path(model) -> str:
    """Module path of the model's language model (decoder stack), e.g. ``model.language_model``."""
    base = getattr(model, "get_base_model", lambda: model)()  # a peft wrapper's model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None:
        raise ValueError(f"{type(base).__name__} exposes no language model (get_decoder); give LoRA targets as a regex")
    for name, module in base.named_modules():
        if module is decoder:
            return name
    raise ValueError(f"the language model of {type(base).__name__} is not one of its submodules")


def resolve_lora_target(model, target: str) -> str:
    """The regex peft gets: ``target`` itself, or for "auto" the Linear leaves of the language model."""
    if target != AUTO_LORA_TARGET:
        return target
    prefix = language_model_path(model)
    inside = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name.startswith(prefix + ".")]
    if not inside:
        raise ValueError(f"the language model {prefix!r} of {type(model).__name__} has no Linear layer to adapt")
    leaves = sorted({name.rsplit(".", 1)[-1] for name in inside})
    return rf"^{re.escape(prefix)}\..*\.(?:{'|'.join(map(re.escape, leaves))})$"


def lora_target_names(model, target_regex: str) -> list[str]:
    """Module paths the LoRA target selects ("auto" or a regex); fails loudly when it selects nothing."""
    return _target_names(model, target_regex, resolve_lora_target(model, target_regex))


def _target_names(model, target: str, resolved: str) -> list[str]:
    pattern = re.compile(resolved)
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)]
    if not names:
        raise ValueError(f"LoRA target regex {target!r} matches no Linear layer of {type(model).__name__}")
    return names


def attach_new_lora(model, settings: LoraSettings, seed: int):
    """A fresh trainable adapter (peft initializes B to zero, A from the seeded RNG)."""
    from peft import LoraConfig, get_peft_model

    target = resolve_lora_target(model, settings.target_modules)
    _target_names(model, settings.target_modules, target)  # refuse a target that selects nothing
    torch.manual_seed(seed)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=target, bias="none")
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
