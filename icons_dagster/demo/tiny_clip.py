"""A tiny, locally built CLIP checkpoint, so the ``clip`` embedder path runs offline in tests.

Why: ``EmbedderConfig(kind="clip")`` loads through ``AutoProcessor``/``AutoModel`` exactly
as a real CLIP would; building a random 2-layer CLIP with a tokenizer trained on the
demo's own texts exercises that code path in a second, without network access. The
vectors mean nothing semantically; only their plumbing (shapes, norms, fingerprints) is real.

Tokenizer: byte-level BPE (never needs ``<unk>``) with CLIP's framing
``<|startoftext|> $A <|endoftext|>``. CLIP's text tower pools at the first ``eos_token_id``,
so every sequence must end with EOS (truncation keeps it) and the EOS id must not be 2,
which transformers treats as a legacy config and pools at the argmax token id instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from icons_dagster.demo.tiny_model import build_checkpoint_folder, save_seeded_model, train_byte_level_bpe

__all__ = ["TinyClipSpec", "build_tiny_clip"]

#: Bump when the build recipe changes so cached builds are not reused.
BUILD_VERSION = 1

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<|startoftext|>", "<|endoftext|>"
#: Order fixes their ids: <unk>=0, <pad>=1, <|startoftext|>=2, <|endoftext|>=3 (EOS != 2, see above).
SPECIAL_TOKENS = (UNK, PAD, BOS, EOS)


@dataclass(frozen=True)
class TinyClipSpec:
    """Sizes of the tiny CLIP; every field enters the build hash."""

    hidden: int = 32
    layers: int = 2
    heads: int = 2
    intermediate: int = 64
    projection_dim: int = 16
    image_size: int = 32
    patch_size: int = 8
    max_position: int = 77  # CLIP's text length
    vocab_size: int = 1000  # BPE target; a small corpus yields fewer tokens


def _build_key(spec: TinyClipSpec, seed: int, texts: list[str]) -> str:
    digest = hashlib.sha256()
    header = {"build_version": BUILD_VERSION, "kind": "tiny-clip", "spec": dataclasses.asdict(spec), "seed": seed}
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _train_tokenizer(corpus: list[str], spec: TinyClipSpec):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bpe = train_byte_level_bpe(corpus, spec.vocab_size, SPECIAL_TOKENS)
    bos_id, eos_id = bpe.token_to_id(BOS), bpe.token_to_id(EOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, bos_id), (EOS, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        model_max_length=spec.max_position,
    )


def _build(out: Path, corpus: list[str], spec: TinyClipSpec, seed: int) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    try:  # transformers 5 without torchvision: the PIL backend is the real one
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as _ImageProcessor
    except ImportError:  # pragma: no cover - older layouts
        from transformers import CLIPImageProcessor as _ImageProcessor

    tokenizer = _train_tokenizer(corpus, spec)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    assert eos_id != 2, "CLIP treats eos_token_id == 2 as a legacy config (argmax pooling)"
    square = {"height": spec.image_size, "width": spec.image_size}
    image_processor = _ImageProcessor(size=dict(square), crop_size=dict(square), do_resize=True, do_center_crop=True)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    shared = dict(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        projection_dim=spec.projection_dim,
    )
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=spec.max_position,
            bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_token_id,
            **shared,
        ),
        vision_config=CLIPVisionConfig(image_size=spec.image_size, patch_size=spec.patch_size, **shared),
        projection_dim=spec.projection_dim,
    )
    save_seeded_model(CLIPModel, config, seed, processor, out)


def build_tiny_clip(out_dir: str | Path, corpus: Iterable[str], seed: int = 0, spec: TinyClipSpec = TinyClipSpec()) -> Path:
    """Build (or reuse) a tiny random CLIP in ``out_dir`` and return its path.

    Reused when ``out_dir``'s manifest carries the same recipe+spec+seed+corpus hash;
    otherwise built in a temporary sibling folder and swapped into place (like
    ``build_tiny_llava``). ``EmbedderConfig(kind="clip", name_or_path=str(out))`` loads it.
    """
    texts = [str(t) for t in corpus]
    key = _build_key(spec, seed, texts)
    manifest = {"kind": "tiny-clip", "build_version": BUILD_VERSION, "seed": seed, "spec": dataclasses.asdict(spec), "num_texts": len(texts)}
    return build_checkpoint_folder(Path(out_dir), key, manifest, lambda tmp: _build(tmp, texts, spec, seed))
