"""Tiny random checkpoints of the other architectures ICONS runs on, built locally.

Why: users run Qwen2.5-VL, Idefics3 / SmolVLM and text-only causal LMs (LESS's setting)
besides LLaVA; each must go through the same code path a real checkpoint takes
(``AutoProcessor`` / ``AutoModelForImageTextToText`` or ``AutoModelForCausalLM`` from a
folder, the model's own chat template and image processor) with no download. So each
builder trains a small byte-level BPE on the demo texts plus the architecture's special
tokens, writes a chat template in that family's format, builds a seeded random model of
the real class from a small config and saves both into a folder. The weights are
meaningless; the tensor plumbing (image token expansion, M-RoPE position ids, image
splitting, pixel masks) is the library's own.

Qwen2.5-VL: transformers 5's Qwen-VL processors insist on a video processor, which needs
torchvision; the build saves the processor without one (``core.model.processor_without_video``,
PIL image processor), and ``load_processor`` loads it back that way, as it loads any such
checkpoint on a machine without torchvision.

Formats: Qwen2.5-VL and the text LM use ChatML (``<|im_start|>role\\n...<|im_end|>\\n``),
Qwen2.5-VL's image part renders ``<|vision_start|><|image_pad|><|vision_end|>``;
Idefics3 renders ``User:<image>text<end_of_utterance>\\nAssistant: answer<end_of_utterance>\\n``
and its processor expands ``<image>`` into row/column tiles and a global image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from icons_dagster.demo.tiny_model import build_checkpoint_folder, save_seeded_model, spec_hash, train_byte_level_bpe

__all__ = ["ARCHITECTURES", "TinyArchSpec", "build_tiny_architecture"]

BUILD_VERSION = 1

# ChatML with image parts as ``image_markup``; the body of a message as in demo/tiny_model.py,
# parts joined by newlines.
_BODY = (
    "{%- if message['content'] is string -%}{%- set body = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(body='', first=true) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set piece = IMAGE -%}{%- else -%}{%- set piece = part['text'] -%}{%- endif -%}"
    "{%- if ns.first -%}{%- set ns.body = piece -%}{%- else -%}{%- set ns.body = ns.body + '\\n' + piece -%}{%- endif -%}"
    "{%- set ns.first = false -%}{%- endfor -%}{%- set body = ns.body -%}{%- endif -%}"
)


def _chatml(image_markup: str) -> str:
    return (
        "{%- set IMAGE = '" + image_markup + "' -%}"
        "{%- for message in messages -%}" + _BODY + "{{ '<|im_start|>' + message['role'] + '\\n' + body + '<|im_end|>\\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


# Idefics3's own turn format (User:/Assistant: with <end_of_utterance>).
_IDEFICS3_TEMPLATE = (
    "{%- set IMAGE = '<image>' -%}"
    "{%- for message in messages -%}" + _BODY + "{{ message['role'] | capitalize }}"
    "{%- if message['role'] == 'assistant' -%}{{ ': ' + body }}{%- else -%}{{ ':' + body }}{%- endif -%}"
    "{{ '<end_of_utterance>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

_CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_VISION_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_IDEFICS3_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)


@dataclasses.dataclass(frozen=True)
class TinyArchSpec:
    """Sizes shared by the tiny builds; every field enters the build hash."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    image_size: int = 32
    vocab_size: int = 1200
    max_position: int = 1024
    seed: int = 0


def _fast_tokenizer(texts: list[str], specials: tuple[str, ...], spec: TinyArchSpec, **named):
    from transformers import PreTrainedTokenizerFast

    bpe = train_byte_level_bpe(texts, spec.vocab_size, specials)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, padding_side="right", model_max_length=spec.max_position, **named)


def _text_config(spec: TinyArchSpec, tokenizer, model_type: str) -> dict:
    return {
        "model_type": model_type,
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": spec.max_position,
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,  # None: these templates write no BOS
    }


def _build_qwen2_5_vl(out: Path, texts: list[str], spec: TinyArchSpec) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from icons_dagster.core.model.loading import processor_without_video

    tokenizer = _fast_tokenizer(texts, _CHATML_SPECIALS + _QWEN_VISION_SPECIALS, spec, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = _chatml("<|vision_start|><|image_pad|><|vision_end|>")
    patch, merge = 8, 2
    pixels = spec.image_size * spec.image_size  # every image resized to this area: (32/8)^2 / 2^2 = 4 tokens
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=merge, temporal_patch_size=2, size={"shortest_edge": pixels, "longest_edge": pixels}
    )
    processor = processor_without_video(Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in _QWEN_VISION_SPECIALS}
    text = _text_config(spec, tokenizer, "qwen2_5_vl_text")
    head_dim = spec.hidden // spec.heads
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]}
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config={
            "depth": spec.vision_layers,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": 2 * spec.vision_hidden,
            "num_heads": 4,
            "patch_size": patch,
            "spatial_merge_size": merge,
            "temporal_patch_size": 2,
            "window_size": 2 * patch * merge,
            "out_hidden_size": spec.hidden,
            "fullatt_block_indexes": [spec.vision_layers - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    save_seeded_model(Qwen2_5_VLForConditionalGeneration, config, spec.seed, processor, out)


def _build_idefics3(out: Path, texts: list[str], spec: TinyArchSpec) -> None:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = _fast_tokenizer(texts, _IDEFICS3_SPECIALS, spec, eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    tokenizer.chat_template = _IDEFICS3_TEMPLATE
    patch, scale = 8, 2
    tile = spec.image_size
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": 2 * tile},  # a square image: 2 x 2 tiles + the global image
        max_image_size={"longest_edge": tile},
        do_image_splitting=True,
    )
    image_seq_len = (tile // patch) ** 2 // scale**2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=_IDEFICS3_TEMPLATE)
    config = Idefics3Config(
        text_config={**_text_config(spec, tokenizer, "llama")},
        vision_config={
            "hidden_size": spec.vision_hidden,
            "intermediate_size": 2 * spec.vision_hidden,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": 4,
            "image_size": tile,
            "patch_size": patch,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    save_seeded_model(Idefics3ForConditionalGeneration, config, spec.seed, processor, out)


def _build_text_lm(out: Path, texts: list[str], spec: TinyArchSpec) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _fast_tokenizer(texts, _CHATML_SPECIALS, spec, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = _chatml("")  # text-only: an image part would render as nothing
    config = Qwen2Config(**{k: v for k, v in _text_config(spec, tokenizer, "qwen2").items() if k != "model_type"})
    save_seeded_model(Qwen2ForCausalLM, config, spec.seed, tokenizer, out)


ARCHITECTURES = {"qwen2_5_vl": _build_qwen2_5_vl, "idefics3": _build_idefics3, "text_lm": _build_text_lm}


def build_tiny_architecture(architecture: str, out_dir: str | Path, corpus: Iterable[str], spec: TinyArchSpec = TinyArchSpec()) -> Path:
    """Build (or reuse) a tiny random checkpoint of ``architecture`` in ``out_dir``; its path.

    Reused when its manifest carries the same hash of (recipe, architecture, spec, corpus);
    built in a temporary sibling and swapped into place otherwise.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    texts = [str(t) for t in corpus]
    key = spec_hash(spec, texts, architecture=architecture, architecture_build_version=BUILD_VERSION)
    manifest = {"build_version": BUILD_VERSION, "architecture": architecture, "spec": dataclasses.asdict(spec), "num_texts": len(texts)}
    return build_checkpoint_folder(Path(out_dir), key, manifest, lambda tmp: ARCHITECTURES[architecture](tmp, texts, spec))
