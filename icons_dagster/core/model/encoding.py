"""Records -> token ids, labels on answer tokens only, and padded batches.

The chat template renders the conversation; answer spans are found by rendering prefixes
(``messages[:i]`` with the generation prompt, then ``messages[:i+1]``), because templates
such as llava-hf's carry no generation markers. Character spans are mapped to tokens
through the fast tokenizer's offsets. Every answer turn of a multi-turn record is labelled.

Processors expand the one image placeholder in their own way (LLaVA: N copies of
``<image>``; Qwen2.5-VL: N ``<|image_pad|>``; Idefics3: rows of tiles with markup tokens
and a global image). So the rendering is split at the placeholder, the text before and
after it is tokenized on its own, and both pieces are checked to be the processor's
prefix and suffix: whatever lies between is the image, of whatever length. Per-token
outputs of the processor besides the ids (Qwen's ``mm_token_type_ids``) are kept, padded
and truncated with the ids. A text-only model (a tokenizer, LESS's setting) gets plain
string contents, as text chat templates expect; an image record is refused for it.
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
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # other per-token processor outputs, [L]


# Processor outputs the encoder rebuilds itself (the mask) or that models do not take.
_NOT_MODEL_INPUTS = {"input_ids", "attention_mask", "token_type_ids"}


def to_messages(turns: Sequence, has_image: bool, text_only_model: bool = False) -> list[dict]:
    """LLaVA turns -> chat messages with an image part where ``<image>`` stood.

    ``text_only_model``: contents are plain strings (text chat templates expect them).
    """
    messages = []
    for turn in turns:
        role = "user" if turn.role == "human" else "assistant"
        text = turn.text
        if text_only_model:
            messages.append({"role": role, "content": text})
        elif has_image and IMAGE_PLACEHOLDER in text:
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
    """Tokenizes records with one processor (or, for a text-only model, a tokenizer); holds no model."""

    def __init__(self, processor, max_length: int):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.accepts_images = getattr(processor, "image_processor", None) is not None
        self.image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one before computing batched gradients")

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def messages(self, turns: Sequence, has_image: bool) -> list[dict]:
        if has_image and not self.accepts_images:
            raise EncodingError("the record has an image but the model is text-only (its processor has no image processor)")
        return to_messages(turns, has_image, text_only_model=not self.accepts_images)

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

    def _offsets(self, text: str, add_special_tokens: bool) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        tokenized = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
        offsets = tokenized["offset_mapping"]
        starts = torch.tensor([a for a, _ in offsets], dtype=torch.long)
        ends = torch.tensor([b for _, b in offsets], dtype=torch.long)
        return list(tokenized["input_ids"]), starts, ends

    def _token_positions(self, text: str, input_ids: torch.Tensor, has_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Character start/end of every token of the processor's ids; the image's own tokens get (-1, -1)."""
        ids = input_ids.tolist()
        if not has_image:
            own, starts, ends = self._offsets(text, add_special_tokens=True)
            if own != ids:
                raise EncodingError("the tokenizer's offsets disagree with the processor's token ids for this template")
            return starts, ends
        count = text.count(self.image_token)
        if count != 1:
            raise EncodingError(f"expected one image placeholder in the rendered prompt, found {count}")
        at = text.index(self.image_token)
        after_at = at + len(self.image_token)
        before_ids, before_starts, before_ends = self._offsets(text[:at], add_special_tokens=True)
        after_ids, after_starts, after_ends = self._offsets(text[after_at:], add_special_tokens=False)
        # the processor may close the sequence with special tokens of its own (an EOS): allow a few
        for trailing in range(3):
            end = len(ids) - trailing
            if end - len(after_ids) <= len(before_ids):
                break
            if ids[: len(before_ids)] == before_ids and ids[end - len(after_ids) : end] == after_ids:
                n_image = end - len(after_ids) - len(before_ids)
                none = torch.full((n_image,), -1, dtype=torch.long)
                tail = torch.full((trailing,), -1, dtype=torch.long)
                starts = torch.cat([before_starts, none, after_starts + after_at, tail])
                ends = torch.cat([before_ends, none, after_ends + after_at, tail])
                return starts, ends
        raise EncodingError("the text around the image does not tokenize as the processor's prefix and suffix for this template")

    def encode(self, record_id: str, turns: Sequence, image=None) -> EncodedSample:
        has_image = image is not None
        messages = self.messages(turns, has_image)
        text, spans = self.answer_spans(messages)
        if has_image:
            processed = self.processor(text=text, images=[image], return_tensors="pt")
        else:
            processed = self.processor(text=text, return_tensors="pt")
        input_ids = processed["input_ids"][0]
        starts, ends = self._token_positions(text, input_ids, has_image)
        is_answer = torch.zeros_like(input_ids, dtype=torch.bool)
        for span_start, span_end in spans:
            is_answer |= (ends > starts) & (starts >= span_start) & (starts < span_end)
        labels = torch.where(is_answer, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        length = input_ids.numel()
        token_inputs = {
            key: value[0]
            for key, value in processed.items()
            if key not in _NOT_MODEL_INPUTS and isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (1, length)
        }
        image_inputs = {
            key: value
            for key, value in processed.items()
            if key not in _NOT_MODEL_INPUTS and key not in token_inputs and isinstance(value, torch.Tensor)
        }

        truncated = length > self.max_length
        if truncated:
            n_image_tokens = int((input_ids == self.image_token_id).sum()) if has_image else 0
            input_ids = input_ids[: self.max_length]
            labels = labels[: self.max_length]
            token_inputs = {key: value[: self.max_length] for key, value in token_inputs.items()}
            kept_image_tokens = int((input_ids == self.image_token_id).sum()) if has_image else 0
            if kept_image_tokens != n_image_tokens:
                raise EncodingError(f"truncation at {self.max_length} tokens cuts through the image tokens")
        # Labels are shifted inside the loss; the first position can never be a target.
        n_answer = int((labels[1:] != IGNORE_INDEX).sum())
        if n_answer == 0:
            reason = f"no answer tokens left after truncation at {self.max_length} tokens" if truncated else "no answer tokens"
            raise EncodingError(reason)
        return EncodedSample(record_id, input_ids, labels, image_inputs, n_answer, truncated, token_inputs)


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]
    image_inputs: dict[str, torch.Tensor]
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, L], zero-padded

    def model_inputs(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device)}
        for key, value in self.token_inputs.items():
            inputs[key] = value.to(device)
        for key, value in self.image_inputs.items():
            value = value.to(device)
            inputs[key] = value.to(dtype) if value.is_floating_point() else value
        return inputs


def _concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate on dim 0; tensors that differ beyond it (Idefics3's per-image crop counts)
    are zero-padded to the largest shape first (models drop all-zero padding images)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for tensor in tensors:
        if list(tensor.shape[1:]) != shape:
            out = tensor.new_zeros((tensor.shape[0], *shape))
            out[tuple(slice(0, n) for n in tensor.shape)] = tensor
            tensor = out
        padded.append(tensor)
    return torch.cat(padded)


def collate(samples: Sequence[EncodedSample], pad_token_id: int) -> Batch:
    """Right-padded batch; image tensors of the samples that have one, concatenated in order."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    length = max(s.input_ids.numel() for s in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    token_keys = sorted({key for s in samples for key in s.token_inputs})
    token_inputs = {
        key: torch.zeros((len(samples), length), dtype=next(s.token_inputs[key].dtype for s in samples if key in s.token_inputs))
        for key in token_keys
    }
    for row, sample in enumerate(samples):
        n = sample.input_ids.numel()
        input_ids[row, :n] = sample.input_ids
        labels[row, :n] = sample.labels
        attention_mask[row, :n] = 1
        for key, value in sample.token_inputs.items():
            token_inputs[key][row, :n] = value
    keys = sorted({key for s in samples for key in s.image_inputs})
    image_inputs = {key: _concat_padded([s.image_inputs[key] for s in samples if key in s.image_inputs]) for key in keys}
    return Batch([s.id for s in samples], input_ids, attention_mask, labels, image_inputs, token_inputs)


def answer_logit_positions(labels: torch.Tensor) -> torch.Tensor:
    """[K] sorted sequence positions whose logits predict an answer token of some row.

    Position t predicts token t + 1, so these are the t with ``labels[:, t + 1]`` not
    ignored in any row: the only logits the loss reads. Passed as ``logits_to_keep``, the
    model applies its vocabulary head to these positions alone (the rest of a LLaVA sample,
    576 image tokens and the prompts, never carries a label).
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over each sample's answer tokens (as HF does per sample), in fp32.

    ``positions``: the sequence positions ``logits`` were computed at (``logits_to_keep``,
    see ``answer_logit_positions``); default every position.
    """
    labels = labels.to(logits.device)
    if positions is None:
        shifted_logits, shifted_labels = logits[:, :-1, :].float(), labels[:, 1:]
    else:
        shifted_logits, shifted_labels = logits.float(), labels[:, positions.to(logits.device) + 1]
    token_loss = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    counts = (shifted_labels != IGNORE_INDEX).sum(dim=1).clamp_min(1)
    return token_loss.sum(dim=1) / counts
