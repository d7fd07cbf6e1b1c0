"""A tiny, locally built LLaVA checkpoint for the demo pipeline and the tests.

Why: the pipeline must exercise exactly the code path a real checkpoint takes
(``AutoProcessor.from_pretrained`` / ``AutoModelForImageTextToText.from_pretrained``)
without any network access and in seconds on a laptop CPU. So we train a byte-level
BPE tokenizer on the demo's own texts, wrap it with a CLIP image processor in a
``LlavaProcessor``, build a randomly initialised ``LlavaForConditionalGeneration``
(CLIP vision tower + Llama language model) from a fixed seed, and ``save_pretrained``
everything into one directory.

Chat-template / BOS convention (the lead relies on it):

* The template renders LLaVA-1.5 style turns and never writes ``<s>`` itself::

      USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT:

  user turn -> ``"USER: " + body``; assistant turn -> ``" ASSISTANT: " + body + "</s>"``;
  ``add_generation_prompt=True`` appends ``" ASSISTANT:"``; a ``system`` turn (optional)
  renders ``body + " "``. ``content`` is a string or a list of parts rendered in order and
  joined by ``"\\n"`` (``{"type": "image"}`` -> ``<image>``, ``{"type": "text"}`` -> its text),
  so image-before-text gives ``<image>\\n{text}`` and text-before-image ``{text}\\n<image>``.
* Every turn renders independently and the renderings are concatenated, hence the
  rendering of ``messages[:i]`` with ``add_generation_prompt=True`` is a string prefix of the
  rendering of ``messages[:i+1]`` (when message ``i`` is the assistant turn), which is a
  string prefix of the full rendering. An answer's characters start right after the
  generation prompt (at the leading space of ``" {answer}</s>"``).
* The BOS token is added by the tokenizer (Llama-style ``TemplateProcessing`` post-processor
  ``<s> $A``), so ``processor(text=rendered, images=...)`` yields exactly one BOS at position 0
  and character offsets in the rendered text map onto tokens after it.

Attention implementation: ``attn_implementation`` is not serialised by transformers 5, so a
reload picks the library default (``sdpa``, which works on CPU); pass
``attn_implementation="eager"`` to ``from_pretrained`` if a caller needs eager attention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TinyModelSpec", "build_tiny_llava", "CHAT_TEMPLATE", "IMAGE_TOKEN", "SPECIAL_TOKENS", "spec_hash"]

#: Bump when the build recipe changes so cached builds are not reused.
BUILD_VERSION = 1
MANIFEST_NAME = "tiny_model.json"

IMAGE_TOKEN = "<image>"
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
#: Order fixes their ids: <unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4.
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE_TOKEN)

# Jinja chat template (see module docstring). It uses ``eos_token`` from the render context,
# which both the tokenizer and the processor supply.
# Inside the loop over messages: sets ``body`` to the message's text, image parts rendered
# as the image token and parts joined by newlines (shared with demo/smollm2.py's ChatML).
MESSAGE_BODY_JINJA = (
    "{%- if message['content'] is string -%}"
    "{%- set body = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(body='', first=true) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set piece = '" + IMAGE_TOKEN + "' -%}"
    "{%- else -%}{%- set piece = part['text'] -%}{%- endif -%}"
    "{%- if ns.first -%}{%- set ns.body = piece -%}"
    "{%- else -%}{%- set ns.body = ns.body + '\\n' + piece -%}{%- endif -%}"
    "{%- set ns.first = false -%}"
    "{%- endfor -%}"
    "{%- set body = ns.body -%}"
    "{%- endif -%}"
)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    + MESSAGE_BODY_JINJA
    + "{%- if message['role'] == 'user' -%}{{ 'USER: ' + body }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ASSISTANT: ' + body + eos_token }}"
    "{%- else -%}{{ body + ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)

# Scaffolding strings fed to the BPE trainer so the template's fixed words become merges.
_TEMPLATE_SNIPPETS = ("USER: ", " ASSISTANT: ", " ASSISTANT:", "USER: \n", "\n")


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the tiny checkpoint; every field enters the build hash."""

    image_size: int = 32
    patch_size: int = 8  # -> (32/8)^2 = 16 image tokens (CLIP's CLS is dropped by "default")
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 64
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2  # grouped-query attention like modern Llamas; head_dim = 16
    intermediate: int = 128
    vocab_size: int = 2000  # BPE *target* size; a small corpus yields fewer tokens
    max_position: int = 512
    seed: int = 0

    @property
    def num_image_tokens(self) -> int:
        """``<image>`` tokens one image expands to (patch grid; CLS dropped)."""
        return (self.image_size // self.patch_size) ** 2

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.text_hidden % self.text_heads or self.text_heads % self.text_kv_heads:
            raise ValueError("text_hidden % text_heads and text_heads % text_kv_heads must be 0")
        if self.vision_hidden % self.vision_heads:
            raise ValueError("vision_hidden must be a multiple of vision_heads")
        if self.vision_layers < 2:
            raise ValueError("vision_layers must be >= 2 (features come from the penultimate layer)")


def spec_hash(spec, corpus: Iterable[str], **recipe) -> str:
    """Hash of build recipe + spec (a dataclass) + corpus: the cache key stored in ``tiny_model.json``.
    ``recipe``: what else a builder's output depends on (demo/tiny_architectures.py)."""
    h = hashlib.sha256()
    h.update(json.dumps({"build_version": BUILD_VERSION, "spec": dataclasses.asdict(spec), **recipe}, sort_keys=True).encode())
    for text in corpus:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide progress bars and the 'no torchvision, using PIL' notice during the build only."""
    from icons_dagster.core.model.loading import no_progress_bars

    with no_progress_bars(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torchvision.*")
        yield


def train_byte_level_bpe(texts: list[str], vocab_size: int, special_tokens):
    """A byte-level BPE (never needs <unk>) trained on ``texts``: the tiny models' tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return bpe


def _train_tokenizer(corpus: list[str], spec: TinyModelSpec):
    """Byte-level BPE with Llama-like BOS insertion, as a fast tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bpe = train_byte_level_bpe([*_TEMPLATE_SNIPPETS, *corpus], spec.vocab_size, SPECIAL_TOKENS)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        # a named extra special token: never split, and exposed as ``tokenizer.image_token``
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        model_max_length=spec.max_position,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llava_processor(spec: TinyModelSpec, tokenizer, chat_template: str):
    """A LlavaProcessor for the tiny vision tower: images resized straight to a square (no
    shortest-edge/aspect surprises), so any image gives exactly spec.num_image_tokens tokens."""
    from transformers import LlavaProcessor

    try:  # transformers 5 without torchvision: the PIL backend is the real one
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as _ImageProcessor
    except ImportError:  # pragma: no cover - older layouts
        from transformers import CLIPImageProcessor as _ImageProcessor

    square = {"height": spec.image_size, "width": spec.image_size}
    return LlavaProcessor(
        image_processor=_ImageProcessor(size=dict(square), crop_size=dict(square), do_resize=True, do_center_crop=True),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by "default"
        chat_template=chat_template,
    )


def vision_config(spec: TinyModelSpec):
    """The tiny CLIP vision tower's config (the tiny LLaVA's and the SmolLM2 LLaVA's)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        intermediate_size=spec.vision_intermediate,
        projection_dim=spec.vision_hidden,
    )


def _build(out: Path, corpus: list[str], spec: TinyModelSpec) -> None:
    """Build tokenizer, processor and model and save them into ``out``."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = _train_tokenizer(corpus, spec)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    processor = llava_processor(spec, tokenizer, CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=vision_config(spec),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads,
            intermediate_size=spec.intermediate,
            max_position_embeddings=spec.max_position,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=image_token_id,
        image_seq_length=spec.num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,  # LLaVA-1.5's choice: penultimate CLIP layer
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    save_seeded_model(LlavaForConditionalGeneration, config, spec.seed, processor, out)


def save_seeded_model(model_class, config, seed: int, processor, out: Path) -> None:
    """Initialise ``model_class(config)`` from ``seed`` and save it with its processor.

    Seeded init => identical bytes for identical inputs; fork_rng leaves the caller's RNG untouched.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def build_tiny_llava(out_dir: str | Path, corpus: Iterable[str], spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Build (or reuse) the tiny LLaVA checkpoint in ``out_dir`` and return its path.

    Reuses an existing build when ``out_dir/tiny_model.json`` carries the same
    spec+corpus hash; otherwise builds in ``<out_dir>.tmp-<pid>`` and swaps it into place,
    so readers never see a half-written checkpoint. Deterministic: the same spec and
    corpus give byte-identical ``model.safetensors``.
    """
    texts = [str(t) for t in corpus]
    key = spec_hash(spec, texts)
    manifest = {
        "build_version": BUILD_VERSION,
        "spec": dataclasses.asdict(spec),
        "num_texts": len(texts),
        "num_image_tokens": spec.num_image_tokens,
    }
    return build_checkpoint_folder(Path(out_dir), key, manifest, lambda tmp: _build(tmp, texts, spec))


def build_checkpoint_folder(out: Path, key: str, manifest: dict, build) -> Path:
    """Reuse ``out`` when its manifest carries ``key``; else ``build(tmp)`` in ``<out>.tmp-<pid>``,
    write the manifest (with ``hash = key``) and swap the folder into place, so readers never
    see a half-written checkpoint."""
    if _manifest_hash(out) == key:
        return out
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with _quiet_transformers():
            build(tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps({"hash": key, **manifest}, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, out, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _manifest_hash(out: Path) -> str | None:
    try:
        return json.loads((out / MANIFEST_NAME).read_text()).get("hash")
    except (OSError, ValueError, AttributeError):
        return None


def _swap_into_place(tmp: Path, out: Path, key: str) -> None:
    """``os.replace`` the finished build onto ``out``; a stale ``out`` is moved aside first.

    A directory rename cannot overwrite a non-empty directory, so an old build is renamed
    to ``<out>.old-<pid>`` and deleted afterwards. If a concurrent builder got there first
    with the same hash, its result is kept and ours is dropped.
    """
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    if out.exists():
        if _manifest_hash(out) == key:  # someone else finished meanwhile
            return
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if _manifest_hash(out) != key:
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
