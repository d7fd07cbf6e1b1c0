"""Tests for the locally built tiny LLaVA checkpoint (icons_dagster.demo.tiny_model).

They check that the checkpoint reloads through the same Auto* path as a real one, that
the chat template / BOS convention the pipeline relies on holds, and that forward passes
with labels work for image, text-only and mixed padded batches.
"""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from icons_dagster.demo.tiny_model import (  # noqa: E402
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    MANIFEST_NAME,
    TinyModelSpec,
    build_tiny_llava,
)

COLORS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
SHAPES = ["square", "circle", "triangle", "star", "cross"]


def make_corpus() -> list[str]:
    """A few hundred short QA strings, like the demo's texts."""
    texts = []
    for i, color in enumerate(COLORS):
        for j, shape in enumerate(SHAPES):
            texts.append(f"What color is the {shape}?")
            texts.append(f"The {shape} is {color}.")
            texts.append(f"How many {shape}s are in the picture? There are {i + j} {shape}s.")
            texts.append(f"Is the {shape} {color}? Yes, it is {color}.")
    for a in range(60):
        texts.append(f"What is {a} plus {a % 7}? It is {a + a % 7}.")
        texts.append(f"Describe item {a}. It is a small {COLORS[a % 8]} {SHAPES[a % 5]}.")
    return texts


CORPUS = make_corpus()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "tiny_llava", CORPUS)


@pytest.fixture
def loaded(tiny_dir, monkeypatch):
    """Reload exactly like a real checkpoint, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    model.eval()
    return processor, model


def image(seed: int = 0, size=(32, 32)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


IMAGE_QA = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]},
    {"role": "assistant", "content": "The square is red."},
]
TEXT_QA = [
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": [{"type": "text", "text": "It is 7."}]},
]


def test_manifest_and_cache(tiny_dir):
    manifest = json.loads((tiny_dir / MANIFEST_NAME).read_text())
    assert manifest["num_image_tokens"] == 16
    mtime = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llava(tiny_dir, CORPUS) == tiny_dir  # cache hit: no rebuild
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert not list(tiny_dir.parent.glob("*.tmp-*"))


def test_reload_types_and_config(loaded):
    processor, model = loaded
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    assert isinstance(processor, LlavaProcessor)
    assert isinstance(model, LlavaForConditionalGeneration)
    tok = processor.tokenizer
    assert processor.chat_template == CHAT_TEMPLATE
    assert tok.chat_template == CHAT_TEMPLATE
    assert model.config.image_token_id == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.text_config.vocab_size == len(tok)
    assert model.config.vision_feature_select_strategy == "default"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")


def test_image_token_is_single_token(loaded):
    processor, _ = loaded
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert tok.encode(IMAGE_TOKEN, add_special_tokens=False) == [image_id]
    ids = tok.encode(f"look{IMAGE_TOKEN}{IMAGE_TOKEN}here", add_special_tokens=False)
    assert ids.count(image_id) == 2
    assert IMAGE_TOKEN not in tok.decode([i for i in ids if i != image_id])


def test_processor_counts_image_tokens_and_one_bos(loaded):
    processor, _ = loaded
    tok = processor.tokenizer
    text = processor.apply_chat_template(IMAGE_QA, tokenize=False)
    assert text == "USER: <image>\nWhat color is the square? ASSISTANT: The square is red.</s>"
    assert not text.startswith(tok.bos_token)
    for size in [(32, 32), (57, 23)]:  # any size is resized to 32x32 -> 16 tokens
        enc = processor(text=text, images=image(size=size), return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        assert ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 16
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids[-1] == tok.eos_token_id
        assert tuple(enc["pixel_values"].shape) == (1, 3, 32, 32)
    # text-only: still exactly one BOS, and no pixel values
    enc = processor(text=processor.apply_chat_template(TEXT_QA, tokenize=False), return_tensors="pt")
    assert enc["input_ids"][0].tolist().count(tok.bos_token_id) == 1
    assert "pixel_values" not in enc


@pytest.mark.parametrize("image_first", [True, False])
def test_generation_prompt_prefix_property(loaded, image_first):
    processor, _ = loaded
    tok = processor.tokenizer
    q1 = [{"type": "text", "text": "What shape is it?"}]
    q1 = [{"type": "image"}, *q1] if image_first else [*q1, {"type": "image"}]
    conv = [
        {"role": "user", "content": q1},
        {"role": "assistant", "content": "A star."},
        {"role": "user", "content": [{"type": "text", "text": "And its color?"}]},
        {"role": "assistant", "content": "Blue."},
    ]
    full = processor.apply_chat_template(conv, tokenize=False)
    expected_q1 = "<image>\nWhat shape is it?" if image_first else "What shape is it?\n<image>"
    assert full == f"USER: {expected_q1} ASSISTANT: A star.</s>USER: And its color? ASSISTANT: Blue.</s>"
    for i, msg in enumerate(conv):
        upto = processor.apply_chat_template(conv[: i + 1], tokenize=False)
        assert full.startswith(upto)
        if msg["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith(" ASSISTANT:")
        assert upto.startswith(prompt)
        assert upto[len(prompt) :] == f" {msg['content']}</s>"
        # the same holds for the tokenizer's own template, and at token level
        assert tok.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=True) == prompt
        p_ids = tok(prompt)["input_ids"]
        assert tok(upto)["input_ids"][: len(p_ids)] == p_ids


def _records(processor):
    tok = processor.tokenizer
    img_enc = processor(text=processor.apply_chat_template(IMAGE_QA, tokenize=False), images=image(1))
    txt_enc = processor(text=processor.apply_chat_template(TEXT_QA, tokenize=False))
    return tok, img_enc, txt_enc


def _labels(ids: torch.Tensor, image_id: int) -> torch.Tensor:
    return ids.masked_fill(ids == image_id, -100)


def test_forward_image_record(loaded):
    processor, model = loaded
    tok, img_enc, _ = _records(processor)
    ids = torch.tensor(img_enc["input_ids"])
    out = model(
        input_ids=ids,
        attention_mask=torch.tensor(img_enc["attention_mask"]),
        pixel_values=torch.as_tensor(img_enc["pixel_values"][0])[None],
        labels=_labels(ids, model.config.image_token_id),
    )
    assert math.isfinite(out.loss.item()) and out.loss.item() > 0
    assert out.logits.shape == (1, ids.shape[1], len(tok))


def test_forward_text_only_record(loaded):
    processor, model = loaded
    _, _, txt_enc = _records(processor)
    ids = torch.tensor(txt_enc["input_ids"])
    out = model(input_ids=ids, attention_mask=torch.tensor(txt_enc["attention_mask"]), labels=ids)
    assert math.isfinite(out.loss.item()) and out.loss.item() > 0


def test_forward_mixed_right_padded_batch(loaded):
    processor, model = loaded
    tok, img_enc, txt_enc = _records(processor)
    seqs = [img_enc["input_ids"][0], txt_enc["input_ids"][0]]
    width = max(len(s) for s in seqs)
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    labels = _labels(ids, model.config.image_token_id).masked_fill(mask == 0, -100)
    pixel_values = torch.as_tensor(img_enc["pixel_values"][0])[None]  # only the image record
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, labels=labels)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    proj = model.model.multi_modal_projector.linear_1.weight.grad
    assert proj is not None and torch.isfinite(proj).all() and proj.abs().sum() > 0

    # Right padding must not change the real tokens' logits of the shorter row.
    with torch.no_grad():
        alone = model(input_ids=ids[1:, : len(seqs[1])], attention_mask=mask[1:, : len(seqs[1])]).logits
        batched = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).logits
    torch.testing.assert_close(batched[1, : len(seqs[1])], alone[0], atol=1e-4, rtol=1e-4)

    # The processor's own batching (pads on the right) gives the same layout.
    enc = processor(
        text=[processor.apply_chat_template(c, tokenize=False) for c in (IMAGE_QA, TEXT_QA)],
        images=[image(1)],
        padding=True,
        return_tensors="pt",
    )
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)


def test_deterministic_build(tmp_path, tiny_dir):
    spec = TinyModelSpec()
    a = build_tiny_llava(tmp_path / "a", CORPUS, spec)
    b = build_tiny_llava(tmp_path / "b", CORPUS, spec)
    blob = (a / "model.safetensors").read_bytes()
    assert blob == (b / "model.safetensors").read_bytes()
    assert blob == (tiny_dir / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    # a different seed changes the weights and rebuilds in place
    c = build_tiny_llava(tmp_path / "a", CORPUS, TinyModelSpec(seed=1))
    assert c == a and (a / "model.safetensors").read_bytes() != blob
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
