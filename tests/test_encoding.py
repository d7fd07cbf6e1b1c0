"""Chat-template tokenization: labels exactly on the answer tokens of every answer turn."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from icons_dagster.core.config import ModelConfig
from icons_dagster.core.model.encoding import IGNORE_INDEX, ConversationEncoder, EncodingError, collate, to_messages
from icons_dagster.core.model.loading import load_processor
from icons_dagster.core.data.records import Turn


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return ConversationEncoder(load_processor(ModelConfig(str(tiny_model_dir))), max_length=512)


def answers(encoder, sample) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(encoder.tokenizer.decode(current))
            current = []
    if current:
        runs.append(encoder.tokenizer.decode(current))
    return runs


def test_multi_turn_labels_every_answer_and_nothing_else(encoder):
    turns = (
        Turn("human", "<image>\nWhat color is the circle?"),
        Turn("gpt", "red"),
        Turn("human", "How many squares?"),
        Turn("gpt", "three squares"),
    )
    sample = encoder.encode("r1", turns, Image.new("RGB", (32, 32), "white"))
    assert answers(encoder, sample) == [" red</s>", " three squares</s>"]
    assert int((sample.input_ids == encoder.image_token_id).sum()) == 16
    assert sample.image_inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert sample.n_answer_tokens == int((sample.labels != IGNORE_INDEX).sum())


def test_image_placeholder_at_the_end_and_text_only(encoder):
    end = encoder.encode("r2", (Turn("human", "What is written?\n<image>"), Turn("gpt", "JAM")), Image.new("RGB", (40, 20)))
    assert answers(encoder, end) == [" JAM</s>"]
    text_only = encoder.encode("r3", (Turn("human", "What is 2 plus 3?"), Turn("gpt", "5")))
    assert answers(encoder, text_only) == [" 5</s>"]
    assert not text_only.image_inputs
    assert int((text_only.input_ids == encoder.image_token_id).sum()) == 0


def test_to_messages_keeps_image_position():
    before = to_messages([Turn("human", "<image>\nQ?"), Turn("gpt", "A")], has_image=True)
    after = to_messages([Turn("human", "Q?\n<image>"), Turn("gpt", "A")], has_image=True)
    assert before[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Q?"}]
    assert after[0]["content"] == [{"type": "text", "text": "Q?"}, {"type": "image"}]
    assert before[1] == {"role": "assistant", "content": [{"type": "text", "text": "A"}]}


def test_truncation_is_reported_and_never_cuts_answers_silently(tiny_model_dir):
    processor = load_processor(ModelConfig(str(tiny_model_dir)))
    long_question = " ".join(["word"] * 60)
    turns = (Turn("human", long_question), Turn("gpt", "yes"), Turn("human", "again?"), Turn("gpt", "no"))
    full = ConversationEncoder(processor, max_length=512).encode("r", turns)
    n = full.input_ids.numel()
    # Cut inside the second answer's prompt: the first answer survives, the sample is marked truncated.
    first_answer_end = int((full.labels != IGNORE_INDEX).nonzero()[0]) + 3
    cut = ConversationEncoder(processor, max_length=first_answer_end).encode("r", turns)
    assert cut.truncated and cut.input_ids.numel() == first_answer_end < n
    assert cut.n_answer_tokens < full.n_answer_tokens
    with pytest.raises(EncodingError, match="no answer tokens left after truncation at 20 tokens"):
        ConversationEncoder(processor, max_length=20).encode("r", turns)


def test_collate_pads_right_and_masks(encoder):
    a = encoder.encode("a", (Turn("human", "Hi?"), Turn("gpt", "yes")))
    b = encoder.encode("b", (Turn("human", "<image>\nWhat color is it?"), Turn("gpt", "blue")), Image.new("RGB", (32, 32)))
    batch = collate([a, b], encoder.tokenizer.pad_token_id)
    length = max(a.input_ids.numel(), b.input_ids.numel())
    assert batch.input_ids.shape == (2, length)
    assert batch.attention_mask[0].sum() == a.input_ids.numel()
    assert (batch.input_ids[0, a.input_ids.numel() :] == encoder.tokenizer.pad_token_id).all()
    assert (batch.labels[0, a.input_ids.numel() :] == IGNORE_INDEX).all()
    assert batch.image_inputs["pixel_values"].shape[0] == 1  # only the image record's pixels
    assert torch.equal(batch.labels[1, : b.labels.numel()], b.labels)


# A template in the llava-hf 1.5 style: roles upper-cased, images first, no end-of-turn token,
# "ASSISTANT:" as the generation prompt and no generation markers.
LLAVA_HF_STYLE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_llava_hf_style_template_without_markers(tiny_model_dir):
    processor = load_processor(ModelConfig(str(tiny_model_dir)))
    processor.chat_template = LLAVA_HF_STYLE
    encoder = ConversationEncoder(processor, max_length=512)
    turns = (Turn("human", "Is there a cat?\n<image>"), Turn("gpt", "Yes"), Turn("human", "Color?"), Turn("gpt", "black"))
    sample = encoder.encode("r", turns, Image.new("RGB", (32, 32)))
    assert [a.strip() for a in answers(encoder, sample)] == ["Yes", "black"]
    assert "USER:" not in "".join(answers(encoder, sample))


def test_collate_pads_per_token_inputs_and_uneven_image_crops():
    from icons_dagster.core.model.encoding import EncodedSample

    short = EncodedSample(
        "a", torch.tensor([5, 6]), torch.tensor([IGNORE_INDEX, 6]),
        image_inputs={"pixel_values": torch.ones(1, 2, 3, 4, 4)},  # two crops
        token_inputs={"mm_token_type_ids": torch.tensor([1, 0])},
    )
    long = EncodedSample(
        "b", torch.tensor([7, 8, 9]), torch.tensor([IGNORE_INDEX, 8, 9]),
        image_inputs={"pixel_values": 2 * torch.ones(1, 3, 3, 4, 4)},  # three crops
        token_inputs={"mm_token_type_ids": torch.tensor([1, 1, 0])},
    )
    batch = collate([short, long], pad_token_id=0)
    assert batch.token_inputs["mm_token_type_ids"].tolist() == [[1, 0, 0], [1, 1, 0]]
    pixels = batch.image_inputs["pixel_values"]
    assert pixels.shape == (2, 3, 3, 4, 4)
    assert (pixels[0, :2] == 1).all() and (pixels[0, 2] == 0).all()  # the missing crop is an all-zero padding image
    assert (pixels[1] == 2).all()
    inputs = batch.model_inputs(torch.device("cpu"), torch.float32)
    assert set(inputs) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values"}


def test_text_only_model_gets_string_contents():
    turns = (Turn("human", "Name a color."), Turn("gpt", "red"))
    assert to_messages(turns, has_image=False, text_only_model=True) == [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "red"},
    ]
