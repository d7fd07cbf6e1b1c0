"""Processors and base models loaded once per process, and what identifies a checkpoint.

A CLI invocation and a run process execute many steps; each loads the same checkpoint, so
the loaded model is kept for the process (keyed by its frozen ``ModelConfig``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from icons_dagster.core.config import LoraSettings, ModelConfig
from icons_dagster.core.model.encoding import ConversationEncoder
from icons_dagster.core.model.loading import Placement, attach_new_lora, load_base_model, load_lora, load_processor, resolve_placement
from icons_dagster.core.storage.fingerprint import checkpoint_identity


class ModelCache:
    """Processors and base models loaded once per process (CLI runs reuse them across steps)."""

    def __init__(self) -> None:
        self._entries: dict[ModelConfig, tuple[Any, Any, Placement]] = {}

    def get(self, config: ModelConfig) -> tuple[Any, Any, Placement]:
        if config not in self._entries:
            placement = resolve_placement(config)
            processor = load_processor(config)
            self._entries[config] = (processor, load_base_model(config, placement), placement)
        return self._entries[config]

    def encoder(self, config: ModelConfig) -> ConversationEncoder:
        return ConversationEncoder(self.get(config)[0], config.max_length)

    @contextmanager
    def with_adapter(self, config: ModelConfig, adapter_dir: Path | None, lora: LoraSettings | None = None, seed: int = 0):
        """The base model wrapped in a saved adapter (or a fresh one); unwrapped again afterwards."""
        _, base, _ = self.get(config)
        peft_model = load_lora(base, adapter_dir) if adapter_dir is not None else attach_new_lora(base, lora, seed)
        try:
            yield peft_model
        finally:
            restored = peft_model.unload()
            restored.eval()
            for parameter in restored.parameters():
                parameter.requires_grad_(False)


MODELS = ModelCache()


def model_fingerprint_fields(config: ModelConfig) -> dict:
    """What identifies the weights: a local folder by content (so every machine of a
    scale-out agrees wherever it mounts the folder, and a checkpoint replaced in place is
    recomputed), a hub id by id, revision and cached commit; then the numerics, not the device."""
    return {
        **checkpoint_identity(config.name_or_path, config.revision),
        "dtype": config.dtype,
        "autocast": config.autocast,
        "max_length": config.max_length,
    }
