"""Records -> token ids, labels on answer tokens only, and padded batches.

The chat template renders the conversation; answer spans are found by rendering prefixes
(``messages[:i]`` with the generation prompt, then ``messages[:i+1]``), because templates
such as llava-hf's carry no generation markers. Character spans are mapped to tokens
through the fast tokenizer's offsets, after checking that this tokenization equals the
processor's own. Every answer turn of a multi-turn record is labelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100


class EncodingError(ValueError):
    """A record that cannot be turned into a training example (reason in the message)."""


@dataclass
class EncodedSample:
    id: str
    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, IGNORE_INDEX outside answers
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. pixel_values [1, C, H, W]
    n_answer_tokens: int = 0
    truncated: bool = False


def to_messages(turns: Sequence, has_image: bool) -> list[dict]:
    """LLaVA turns -> chat messages with an image part where ``<image>`` stood."""
    messages = []
    for turn in turns:
        role = "user" if turn.role == "human" else "assistant"
        text = turn.text
        if has_image and IMAGE_PLACEHOLDER in text:
            parts: list[dict] = []
            pieces = text.split(IMAGE_PLACEHOLDER)
            for position, piece in enumerate(pieces):
                if position > 0:
                    parts.append({"type": "image"})
                piece = piece.strip()
                if piece:
                    parts.append({"type": "text", "text": piece})
            messages.append({"role": role, "content": parts})
        else:
            messages.append({"role": role, "content": [{"type": "text", "text": text}]})
    return messages


class ConversationEncoder:
    """Tokenizes records with one processor; holds no model."""

    def __init__(self, processor, max_length: int):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one before computing batched gradients")

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def answer_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and the character span of every assistant turn in it."""
        full = self.render(messages, add_generation_prompt=False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start_text = self.render(messages[:index], add_generation_prompt=True)
            end_text = self.render(messages[: index + 1], add_generation_prompt=False)
            if not full.startswith(start_text) or not full.startswith(end_text) or len(end_text) <= len(start_text):
                raise EncodingError(
                    "the chat template is not prefix-stable (a conversation prefix does not render as a prefix), "
                    "so answer tokens cannot be located"
                )
            spans.append((len(start_text), len(end_text)))
        return full, spans

    def encode(self, record_id: str, turns: Sequence, image=None) -> EncodedSample:
        messages = to_messages(turns, has_image=image is not None)
        text, spans = self.answer_spans(messages)
        if image is not None:
            processed = self.processor(text=text, images=[image], return_tensors="pt")
        else:
            processed = self.processor(text=text, return_tensors="pt")
        input_ids = processed["input_ids"][0]
        n_image_tokens = int((input_ids == self.image_token_id).sum()) if image is not None else 0

        # The processor expands each image placeholder in place; expand the text the same way so
        # character offsets line up with its token ids.
        expanded = text
        shift = 0
        if image is not None:
            count = text.count(self.image_token)
            if count != 1:
                raise EncodingError(f"expected one image placeholder in the rendered prompt, found {count}")
            expanded = text.replace(self.image_token, self.image_token * n_image_tokens)
            shift = len(self.image_token) * (n_image_tokens - 1)
            image_at = text.index(self.image_token)
            spans = [(a + shift if a > image_at else a, b + shift if b > image_at else b) for a, b in spans]
        tokenized = self.tokenizer(expanded, return_offsets_mapping=True)
        if list(tokenized["input_ids"]) != input_ids.tolist():
            raise EncodingError("the tokenizer's offsets disagree with the processor's token ids for this template")
        starts = torch.tensor([start for start, _ in tokenized["offset_mapping"]], dtype=torch.long)
        ends = torch.tensor([end for _, end in tokenized["offset_mapping"]], dtype=torch.long)
        is_answer = torch.zeros_like(input_ids, dtype=torch.bool)
        for span_start, span_end in spans:
            is_answer |= (ends > starts) & (starts >= span_start) & (starts < span_end)
        labels = torch.where(is_answer, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

        truncated = input_ids.numel() > self.max_length
        if truncated:
            input_ids = input_ids[: self.max_length]
            labels = labels[: self.max_length]
            kept_image_tokens = int((input_ids == self.image_token_id).sum()) if image is not None else 0
            if kept_image_tokens != n_image_tokens:
                raise EncodingError(f"truncation at {self.max_length} tokens cuts through the image tokens")
        # Labels are shifted inside the loss; the first position can never be a target.
        n_answer = int((labels[1:] != IGNORE_INDEX).sum())
        if n_answer == 0:
            reason = f"no answer tokens left after truncation at {self.max_length} tokens" if truncated else "no answer tokens"
            raise EncodingError(reason)
        image_inputs = {
            key: value
            for key, value in processed.items()
            if key not in {"input_ids", "attention_mask", "token_type_ids"} and isinstance(value, torch.Tensor)
        }
        return EncodedSample(record_id, input_ids, labels, image_inputs, n_answer, truncated)


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]
    image_inputs: dict[str, torch.Tensor]

    def model_inputs(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device)}
        for key, value in self.image_inputs.items():
            value = value.to(device)
            inputs[key] = value.to(dtype) if value.is_floating_point() else value
        return inputs


def collate(samples: Sequence[EncodedSample], pad_token_id: int) -> Batch:
    """Right-padded batch; image tensors of the samples that have one, concatenated in order."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    length = max(s.input_ids.numel() for s in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = sample.input_ids.numel()
        input_ids[row, :n] = sample.input_ids
        labels[row, :n] = sample.labels
        attention_mask[row, :n] = 1
    keys = sorted({key for s in samples for key in s.image_inputs})
    image_inputs = {key: torch.cat([s.image_inputs[key] for s in samples if key in s.image_inputs]) for key in keys}
    return Batch([s.id for s in samples], input_ids, attention_mask, labels, image_inputs)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each sample's answer tokens (as HF does per sample), in fp32."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:].to(logits.device)
    token_loss = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    counts = (shifted_labels != IGNORE_INDEX).sum(dim=1).clamp_min(1)
    return token_loss.sum(dim=1) / counts
