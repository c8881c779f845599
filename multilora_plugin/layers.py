"""`MultiLoRALinear`: a linear layer plus slot-indexed LoRA weights, and the swap that installs it."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .dora import magnitude_gain
from .kernels.bank import SlotBank
from .mapping import ForwardContext

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_shape(layer: nn.Module) -> tuple:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (weight stored [in, out])."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    raise TypeError(f"expected nn.Linear or transformers Conv1D, but got {type(layer).__name__}")


def pair_pieces(w, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The slot pieces of one LoRA pair at its rank r: "a" [r, in] and "b" [r, out] (B transposed)."""
    rank = 0 if w is None or w.a is None else w.a.shape[-2]
    if not rank:
        return {}
    lead = tuple(w.a.shape[:-2])  # () for a linear map, (E,) for fused experts
    return {"a": (lead + (rank, in_features), dtype, device), "b": (lead + (rank, out_features), dtype, device)}


@torch.no_grad()
def copy_pair(views: dict, w, non_blocking: bool = False) -> None:
    """`w.a` [..., r, in] and scaled `w.b` [..., out, r] into a slot's "a" and "b" ([..., r, out]) views."""
    if "a" in views:
        views["a"].copy_(w.a, non_blocking=non_blocking)
        views["b"].copy_(w.b.transpose(-1, -2), non_blocking=non_blocking)


class MultiLoRALinear(nn.Module):
    """y = base_layer(x) + the LoRA delta of each row's slot.

    Each slot's A and Bᵀ are views at the adapter's own rank (`bank`, a `SlotBank`), placed by the
    model's slot memory; rank 0 (an empty slot, or an adapter that leaves this layer alone) adds
    nothing, and rows of slot -1 get exactly `base_layer(x)`.
    """

    def __init__(self, base_layer: nn.Module, num_slots: int, context: ForwardContext, backend,
                 compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        weight = base_layer.weight
        # a quantized base (bitsandbytes' uint8 / int8 weights) keeps its own forward; the LoRA delta
        # runs in the model's compute dtype
        self.dtype = weight.dtype if weight.dtype.is_floating_point or compute_dtype is None else compute_dtype
        self.bank = SlotBank(num_slots, self.in_features, self.out_features, weight.device, self.dtype)
        # per-slot terms added to each row of that slot's tokens: DoRA's g - 1, which rescales the base
        # output, and LoRA biases (`lora_bias=True`), scaled; [out] views or None
        self.gains: list = [None] * num_slots
        self.biases: list = [None] * num_slots
        self.context = context
        self.backend = backend
        self.head = False  # the output embedding: in transformers' continuous batching it sees the kept rows only

    @property
    def device(self) -> torch.device:
        return self.bank.device

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        mapping = self.context.mapping
        if mapping is None or not mapping.has_lora:
            return y
        x2 = x.reshape(-1, self.in_features).to(self.dtype)  # [T, in]
        tokens = (mapping.head_tokens if self.head else mapping.tokens)(x2.shape[0], x.device)
        rows = self._row_terms(y.view(-1, self.out_features), tokens)  # computed from the base output
        if y.dtype == self.dtype:
            y2 = y.view(-1, self.out_features)  # [T, out], a view: the delta lands in y
            self.backend.add_lora(y2, x2, self.bank, tokens)
            if rows is not None:
                y2.add_(rows)
            return y
        delta = torch.zeros(x2.shape[0], self.out_features, device=y.device, dtype=self.dtype)  # [T, out]
        self.backend.add_lora(delta, x2, self.bank, tokens)
        if rows is not None:
            delta.add_(rows)
        return y + delta.view(y.shape).to(y.dtype)

    def _row_terms(self, y2: torch.Tensor, tokens) -> Optional[torch.Tensor]:
        """[T, out]: DoRA's (g - 1) * (base output - bias) plus the LoRA bias of every token's slot; None
        when no slot of the batch has either."""
        segments = [seg for seg in tokens.segments
                    if self.gains[seg[0]] is not None or self.biases[seg[0]] is not None]
        if not segments:
            return None
        out = torch.zeros(y2.shape[0], self.out_features, device=y2.device, dtype=self.dtype)
        base_bias = getattr(self.base_layer, "bias", None)
        for slot, start, end in segments:
            rows = tokens.index[start:end].long()
            term = 0
            if self.gains[slot] is not None:
                base = y2.index_select(0, rows).to(self.dtype)
                if base_bias is not None:
                    base = base - base_bias.to(self.dtype)
                term = self.gains[slot] * base
            if self.biases[slot] is not None:
                term = term + self.biases[slot]
            out.index_copy_(0, rows, torch.broadcast_to(term, (end - start, self.out_features)).contiguous())
        return out

    def slot_pieces(self, w) -> dict:
        """What an adapter's weights for this layer take in slot memory."""
        pieces = pair_pieces(w, self.in_features, self.out_features, self.dtype, self.device)
        for name, piece in (("magnitude", "gain"), ("bias", "bias")):
            if pieces and name in w.extra:
                pieces[piece] = ((self.out_features,), self.dtype, self.device)
        return pieces

    def bind(self, slot: int, views: dict) -> None:
        """Point slot `slot` at `views` (a write's, or the same data after the slot memory moved it)."""
        self.bank.bind(slot, views.get("a"), views.get("b"))
        self.gains[slot], self.biases[slot] = views.get("gain"), views.get("bias")

    @torch.no_grad()
    def write_slot(self, slot: int, w, views: dict, non_blocking: bool = False) -> None:
        """Put an adapter's weights for this layer (`ModuleWeights`: `a` [r, in], scaled `b` [out, r],
        DoRA's "magnitude" [out], a scaled "bias" [out]) into its slot `views`; None empties the slot.
        DoRA's rescale of B is folded in here. `non_blocking` copies from pinned CPU memory (CUDA)."""
        self.bind(slot, views)
        if not views:
            return
        copy_pair(views, w, non_blocking)
        if "gain" in views:
            g = magnitude_gain(self.base_layer, views["a"], views["b"].T,
                               w.extra["magnitude"].to(self.device, non_blocking=non_blocking))
            views["b"].mul_(g.unsqueeze(0).to(self.dtype))
            views["gain"].copy_(g - 1)
        if "bias" in views:
            views["bias"].copy_(w.extra["bias"], non_blocking=non_blocking)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={self.bank.num_slots}"


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
