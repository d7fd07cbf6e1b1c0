"""Batched per-sample gradients of the LoRA parameters, projected as they are formed.

Each LoRA Linear (the A and B matrices of every adapted layer) saves its input in the
forward pass and its output gradient in the backward pass; one backward on the sum of the
per-sample losses then gives each sample's weight gradient as one einsum per module:
``G[b] = sum_t dY[b, t]^T X[b, t]``. Padding rows carry zero output gradient (the loss
ignores them and attention masks them), so the result equals the batch-1 loop.

Features are formed inside the backward pass: as each module's output gradient arrives,
its per-sample gradient is made, preconditioned, projected into the batch's features and
dropped with the module's saved input. No module's output gradient outlives its hook, so
memory holds one module's [B, numel] gradient at a time. Kept until the end of the
backward, the output gradients of LLaVA-7B's 224 LoRA B matrices would take ~45 GB in
bf16 at batch 8 x 2048 tokens (measured on the mid-size demo model: peak 10% lower).

Under gradient checkpointing the hooks keep no input from the forward of a checkpointed
layer (holding them would keep every layer's activations and undo the checkpointing); a
module's input is taken when the backward replays its layer, and a gradient that arrives
before that replay waits for it. The hooks then hold one layer's inputs at a time (4x
less than keeping them from the forward, on the mid-size demo model).

The forward applies the vocabulary head only at the positions whose logits the loss reads
(the union over the batch of the answer tokens' predecessors, ``logits_to_keep``), where
the model's forward takes that argument (LLaVA, Qwen2.5-VL, Idefics3 and causal LMs in
transformers 5 do): the loss and every gradient are those of the full head, without the
B x T x vocab logits and their log-softmax (at LLaVA-7B batch 8 x 2,048 tokens, ~2 GB
each in fp32; on the tiny demo model the features got 1.14x faster).

Training features are SGD gradients by default (the paper) or Adam-preconditioned (LESS):
with the warm-up optimizer's moments m, v at the checkpoint,
``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2``, ``feature = m' / (sqrt(v') + eps)``:
eps outside the square root and no bias correction (the moments come from a finished run).
Validation features are always SGD gradients.

Mixed precision: the forward pass may run under autocast (bf16 on CUDA); the saved inputs
and output gradients are upcast to fp32 before the per-sample einsum and the projection,
so features accumulate in fp32 whatever the forward precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

from icons_dagster.core.model.encoding import Batch, answer_logit_positions, per_sample_loss
from icons_dagster.core.model.training import AdamMoments
from icons_dagster.core.model.loading import Placement, gradient_mode, keeps_logits, trainable_parameters


# Bump when the features' bits change for the same config and inputs, so no gradient
# artifact written by an older computation is reused (part of their fingerprints).
# 2: the vocabulary head runs at answer positions only (losses differ in the last bit).
FEATURES_VERSION = 2


@dataclass(frozen=True)
class _Slot:
    name: str  # parameter name
    module: torch.nn.Linear
    offset: int  # position of this parameter in the concatenated gradient vector
    numel: int


class PerSampleGradients:
    """Hooks on the LoRA A/B Linear modules of a peft model; use as a context manager."""

    def __init__(self, model, placement: Placement | None = None):
        self.model = model
        self.placement = placement
        params = trainable_parameters(model)
        if not params:
            raise ValueError("the model has no trainable (LoRA) parameters")
        by_param = {id(p): name for name, p in params}
        slots: list[_Slot] = []
        offset = 0
        owner = {}
        # imported here: transformers takes seconds to import, and the code location (every run
        # worker, the daemon) imports this module without computing a gradient
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers_around: dict[int, list] = {}  # module -> the checkpointable layers it sits in
        for _module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and id(module.weight) in by_param:
                owner[id(module.weight)] = module
            if isinstance(module, GradientCheckpointingLayer):
                for inner in module.modules():
                    layers_around.setdefault(id(inner), []).append(module)
        for name, param in params:
            module = owner.get(id(param))
            if module is None or module.bias is not None and module.bias.requires_grad:
                raise ValueError(f"trainable parameter {name} is not the weight of a bias-free Linear module")
            slots.append(_Slot(name, module, offset, param.numel()))
            offset += param.numel()
        self.slots = slots
        self.dimension = offset
        # the vocabulary head only at the positions the loss reads (answer tokens), where the
        # model's forward can be told so: the same loss, without B x T x vocab logits
        self._keeps_logits = keeps_logits(model)
        self._layers_around = {i: layers_around[id(slot.module)] for i, slot in enumerate(slots) if id(slot.module) in layers_around}
        self._replayed: set[int] = set()  # this backward's modules whose input comes from the replay
        self._forward_calls: dict[int, int] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._output_grads: dict[int, torch.Tensor] = {}
        self._consume: Callable[[_Slot, torch.Tensor], None] | None = None
        self._consumed: set[int] = set()
        self._handles: list = []

    def __enter__(self) -> PerSampleGradients:
        for index, slot in enumerate(self.slots):
            self._handles.append(slot.module.register_forward_hook(self._forward_hook(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.release()

    def release(self) -> None:
        """Drop the saved activations and gradients (after a failed batch, before retrying)."""
        self._inputs.clear()
        self._output_grads.clear()
        self._consumed.clear()
        self._consume = None
        self._forward_calls.clear()
        self.model.zero_grad(set_to_none=True)

    def _forward_hook(self, index: int) -> Callable:
        """Save the module's input and hook its output's gradient.

        Under gradient checkpointing a module inside a replayed layer runs twice: in the
        forward (its output is the one in the graph: hook it, but keep no input, or the
        hooks would hold every layer's activations and undo the checkpointing) and again in
        the backward's replay just before its gradient arrives (keep the input then).
        """

        def hook(module, inputs, output):
            call = self._forward_calls.get(index, 0)
            self._forward_calls[index] = call + 1
            if call == 0:
                if index not in self._replayed:
                    self._inputs[index] = inputs[0].detach()
                output.register_hook(save_grad)
            elif call == 1 and index in self._replayed:
                self._inputs[index] = inputs[0].detach()
                ready()

        def save_grad(grad: torch.Tensor) -> None:
            # A gradient may arrive before the replay of its layer (a module whose output
            # is only added to the residual): it waits for the input then.
            self._output_grads[index] = grad.detach()
            if index in self._inputs:
                ready()

        def ready() -> None:
            """Hand the module's gradient to the consumer once both halves are here."""
            if self._consume is not None and index in self._output_grads and index not in self._consumed:
                self._consumed.add(index)
                slot = self.slots[index]
                self._consume(slot, _per_sample_gradient(self._inputs.pop(index), self._output_grads.pop(index), slot.numel))

        return hook

    def backward(
        self, batch: Batch, device: torch.device, dtype: torch.dtype, consume: Callable[[_Slot, torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """Forward + one backward on the summed per-sample losses; returns the losses [B].

        With ``consume``, each module's per-sample gradient [B, numel] (fp32) goes to
        ``consume(slot, block)`` inside the backward, as its output gradient arrives, in
        the backward's (fixed) order; without, the output gradients are kept for ``blocks``.
        """
        self.release()
        self._consume = consume
        placement = self.placement or Placement(device, dtype)
        self._replayed = set()
        if placement.gradient_checkpointing:  # the layers transformers' checkpointing replays
            self._replayed = {i for i, layers in self._layers_around.items() if any(layer.gradient_checkpointing for layer in layers)}
        positions = answer_logit_positions(batch.labels).to(device) if self._keeps_logits else None
        if positions is not None and not positions.numel():
            positions = None  # no answer token in the batch: the full head, as without the argument
        head = {} if positions is None else {"logits_to_keep": positions}
        try:
            with gradient_mode(self.model, placement):
                # a replay that stops early would skip the hooks of a layer's last modules
                with placement.forward_context(), set_checkpoint_early_stop(False):
                    outputs = self.model(**batch.model_inputs(device, dtype), **head)
                    losses = per_sample_loss(outputs.logits, batch.labels, positions)
                losses.sum().backward()
        finally:
            self._consume = None
        # a module is complete once handed over, or (kept for ``blocks``) once both halves are here
        complete = self._consumed if consume is not None else self._output_grads.keys() & self._inputs.keys()
        missing = [slot.name for i, slot in enumerate(self.slots) if i not in complete]
        if missing:
            raise RuntimeError(f"no gradient (or, under gradient checkpointing, no replayed input) reached {len(missing)} LoRA modules, e.g. {missing[:3]}")
        return losses.detach()

    def blocks(self, batch_size: int):
        """Yield (slot, per-sample gradient [B, numel] in fp32) for every LoRA parameter
        (after ``backward`` without ``consume``)."""
        for index, slot in enumerate(self.slots):
            yield slot, _per_sample_gradient(self._inputs[index], self._output_grads[index], slot.numel)

    def full_gradients(self, batch: Batch, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Unprojected per-sample gradients [B, D] (tests and small models only)."""
        self.backward(batch, device, dtype)
        out = torch.empty((len(batch.ids), self.dimension), dtype=torch.float32, device=device)
        for slot, block in self.blocks(len(batch.ids)):
            out[:, slot.offset : slot.offset + slot.numel] = block
        return out


def _per_sample_gradient(x: torch.Tensor, dy: torch.Tensor, numel: int) -> torch.Tensor:
    """``G[b] = sum_t dY[b, t]^T X[b, t]`` flattened to [B, numel], in fp32."""
    x, dy = x.float(), dy.float()
    if x.dim() == 2:  # [B, in] without a time axis
        x, dy = x.unsqueeze(1), dy.unsqueeze(1)
    return torch.einsum("bto,bti->boi", dy, x).reshape(x.shape[0], numel)


def adam_precondition(block: torch.Tensor, moments: AdamMoments, name: str) -> torch.Tensor:
    """LESS's Adam feature of per-sample gradients ``block`` [B, n] for parameter ``name``."""
    m = moments.exp_avg[name].reshape(1, -1).to(block.device, torch.float32)
    v = moments.exp_avg_sq[name].reshape(1, -1).to(block.device, torch.float32)
    m_new = moments.beta1 * m + (1.0 - moments.beta1) * block
    v_new = moments.beta2 * v + (1.0 - moments.beta2) * block.square()
    return m_new / (v_new.sqrt() + moments.eps)


def projected_features(
    hooks: PerSampleGradients,
    batch: Batch,
    projector,
    device: torch.device,
    dtype: torch.dtype,
    moments: AdamMoments | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected per-sample features [B, d'] (fp32, not yet normalized) and the losses [B],
    each module projected inside the backward as its gradient is formed."""
    out = torch.zeros((len(batch.ids), projector.dim), dtype=torch.float32, device=device)

    def project(slot: _Slot, block: torch.Tensor) -> None:
        if moments is not None:
            block = adam_precondition(block, moments, slot.name)
        projector.project_block(block, slot.offset, out)

    losses = hooks.backward(batch, device, dtype, consume=project)
    return out, losses


def loop_gradients(model, samples, pad_token_id: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The LESS-style reference: batch 1, backward, flatten ``.grad``; [N, D] fp32."""
    from icons_dagster.core.model.encoding import collate

    params = trainable_parameters(model)
    rows = []
    for sample in samples:
        model.zero_grad(set_to_none=True)
        batch = collate([sample], pad_token_id)
        outputs = model(**batch.model_inputs(device, dtype))
        per_sample_loss(outputs.logits, batch.labels).sum().backward()
        rows.append(torch.cat([p.grad.detach().float().reshape(-1) for _, p in params]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)
