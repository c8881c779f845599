"""`MultiLoRALinear`: a linear layer plus slot-indexed LoRA weights, and the swap that installs it."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .dora import magnitude_gain
from .mapping import ForwardContext

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_shape(layer: nn.Module) -> tuple:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (weight stored [in, out])."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    raise TypeError(f"expected nn.Linear or transformers Conv1D, but got {type(layer).__name__}")


def add_slot_buffers(module: nn.Module, max_loras: int, max_lora_rank: int, in_features: int, out_features: int,
                     device: torch.device, dtype: torch.dtype) -> None:
    """Register a linear map's slot buffers on `module`: `lora_a` [S, R, in], `lora_b` [S, out, R],
    `lora_ranks` [S], and `host_ranks` (the same ranks on the host, so no layer waits for the device)."""
    module.register_buffer("lora_a", torch.zeros(max_loras, max_lora_rank, in_features, device=device, dtype=dtype),
                           persistent=False)
    module.register_buffer("lora_b", torch.zeros(max_loras, out_features, max_lora_rank, device=device, dtype=dtype),
                           persistent=False)
    module.register_buffer("lora_ranks", torch.zeros(max_loras, device=device, dtype=torch.int32), persistent=False)
    module.host_ranks = [0] * max_loras


@torch.no_grad()
def write_slot(module: nn.Module, slot: int, a: Optional[torch.Tensor], b: Optional[torch.Tensor],
               non_blocking: bool = False) -> None:
    """`a` [r, in] and scaled `b` [out, r] into slot `slot` of buffers made by `add_slot_buffers`
    (None empties it)."""
    module.lora_a[slot].zero_()
    module.lora_b[slot].zero_()
    rank = 0 if a is None else a.shape[0]
    if rank:
        module.lora_a[slot, :rank].copy_(a, non_blocking=non_blocking)
        module.lora_b[slot, :, :rank].copy_(b, non_blocking=non_blocking)
    module.lora_ranks[slot].fill_(rank)
    module.host_ranks[slot] = rank


class MultiLoRALinear(nn.Module):
    """y = base_layer(x) + the LoRA delta of each row's slot.

    Slot buffers are padded to `max_lora_rank`; `lora_ranks[s]` is the true rank in slot s (0 = empty
    or not targeted by the adapter in that slot), and kernels never read past it. Zero padding adds
    exactly zero, so rows of slot s get the adapter's exact delta and rows of slot -1 get exactly
    `base_layer(x)`.
    """

    def __init__(self, base_layer: nn.Module, max_loras: int, max_lora_rank: int, context: ForwardContext, backend,
                 compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        weight = base_layer.weight
        # a quantized base (bitsandbytes' uint8 / int8 weights) keeps its own forward; the LoRA delta
        # runs in the model's compute dtype
        dtype = weight.dtype if weight.dtype.is_floating_point or compute_dtype is None else compute_dtype
        add_slot_buffers(self, max_loras, max_lora_rank, self.in_features, self.out_features, weight.device, dtype)
        # per-slot terms added to each row of that slot's tokens (row S stays zero: slot -1 reads it):
        # DoRA's g - 1, which rescales the base output, and LoRA biases (`lora_bias=True`), scaled;
        # [S + 1, out] each, allocated when the first adapter that has one is written
        for name in ("row_gain", "row_bias"):
            self.register_buffer(name, torch.zeros(max_loras + 1, 0, device=weight.device, dtype=dtype),
                                 persistent=False)
        self.host_terms = [(False, False)] * max_loras  # (has DoRA, has a bias) per slot, on the host
        self.context = context
        self.backend = backend
        self.head = False  # the output embedding: in transformers' continuous batching it sees the kept rows only

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        mapping = self.context.mapping
        if mapping is None or not mapping.has_lora:
            return y
        x2 = x.reshape(-1, self.in_features).to(self.lora_a.dtype)  # [T, in]
        tokens = (mapping.head_tokens if self.head else mapping.tokens)(x2.shape[0], x.device)
        rows = self._row_terms(y.view(-1, self.out_features), tokens)  # computed from the base output
        if y.dtype == self.lora_a.dtype:
            y2 = y.view(-1, self.out_features)  # [T, out], a view: the delta lands in y
            self.backend.add_lora(y2, x2, self.lora_a, self.lora_b, self.lora_ranks, tokens, host_ranks=self.host_ranks)
            if rows is not None:
                y2.add_(rows)
            return y
        delta = torch.zeros(x2.shape[0], self.out_features, device=y.device, dtype=self.lora_a.dtype)  # [T, out]
        self.backend.add_lora(delta, x2, self.lora_a, self.lora_b, self.lora_ranks, tokens, host_ranks=self.host_ranks)
        if rows is not None:
            delta.add_(rows)
        return y + delta.view(y.shape).to(y.dtype)

    def _row_terms(self, y2: torch.Tensor, tokens) -> Optional[torch.Tensor]:
        """[T, out]: DoRA's (g - 1) * (base output - bias) plus the LoRA bias of every token's slot; None
        when no slot of the batch has either."""
        terms = [self.host_terms[s] for s, _, _ in tokens.segments]
        dora, bias = any(t[0] for t in terms), any(t[1] for t in terms)
        if not (dora or bias):
            return None
        slots = tokens.token_slots.long()  # [T]; -1 reads row S, zero
        out = None
        if dora:
            base = y2.to(self.row_gain.dtype)
            base_bias = getattr(self.base_layer, "bias", None)
            if base_bias is not None:
                base = base - base_bias.to(base.dtype)
            out = self.row_gain[slots] * base
        if bias:
            out = self.row_bias[slots] if out is None else out + self.row_bias[slots]
        return out

    @torch.no_grad()
    def write_slot(self, slot: int, a: Optional[torch.Tensor], b: Optional[torch.Tensor],
                   non_blocking: bool = False, magnitude: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None) -> None:
        """Put an adapter's `a` [r, in] and scaled `b` [out, r] in `slot`; None empties the slot.
        `magnitude` [out]: DoRA's (its rescale is folded in here); `bias` [out]: a scaled LoRA bias.
        `non_blocking` copies from pinned CPU memory without waiting (CUDA)."""
        write_slot(self, slot, a, b, non_blocking)
        if (magnitude is not None or bias is not None) and not self.row_gain.shape[1]:
            self.row_gain = self.row_gain.new_zeros(self.row_gain.shape[0], self.out_features)
            self.row_bias = self.row_bias.new_zeros(self.row_bias.shape[0], self.out_features)
        self.row_gain[slot].zero_()
        self.row_bias[slot].zero_()
        if magnitude is not None and a is not None:
            rank = a.shape[0]
            gain = magnitude_gain(self.base_layer, self.lora_a[slot, :rank], self.lora_b[slot, :, :rank],
                                  magnitude.to(self.lora_a.device, non_blocking=non_blocking))
            self.lora_b[slot, :, :rank].mul_(gain.unsqueeze(1).to(self.lora_b.dtype))
            self.row_gain[slot].copy_(gain - 1)
        if bias is not None:
            self.row_bias[slot].copy_(bias, non_blocking=non_blocking)
        self.host_terms[slot] = (magnitude is not None and a is not None, bias is not None)

    def slot_bytes(self) -> int:
        """Memory the slot buffers reserve."""
        return sum(t.numel() * t.element_size()
                   for t in (self.lora_a, self.lora_b, self.lora_ranks, self.row_gain, self.row_bias))

    def extra_repr(self) -> str:
        slots, rank, _ = self.lora_a.shape
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={slots}, max_rank={rank}"


def swap_modules(
    module: nn.Module, make: Callable[[str, nn.Module], Optional[nn.Module]], prefix: str = ""
) -> dict:
    """Replace, depth first, every child for which `make(name, child)` returns a module; descend
    into the others.

    Returns {qualified name: new module}. A patched layer is not descended into.
    """
    swapped = {}
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        replacement = make(name, child)
        if replacement is not None:
            setattr(module, child_name, replacement)
            swapped[name] = replacement
        else:
            swapped.update(swap_modules(child, make, name))
    return swapped
