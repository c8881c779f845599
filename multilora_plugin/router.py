"""LoRA on a MoE router: PEFT's `target_parameters=["gate.weight"]` (what `"all-linear"` writes for MoE models).

A router is no `nn.Linear`: its forward (Mixtral's, Qwen3-MoE's, OLMoE's, gpt-oss's `TopKRouter`)
applies its 2-D `weight` [E, hidden] with `F.linear` and then softmax, top-k and renormalisation of
its own. LoRA changes the weight, so the delta belongs to the logits, before the top-k:

    router_logits = F.linear(x, W) + scale * x @ A.T @ B.T

`MultiLoRARouter` keeps the router as `base_layer` and runs its own forward with a torch function
mode that adds each token's delta to the one `F.linear` that reads this weight. Everything else the
router does (the top-k, its dtype casts, a bias) stays the router's.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import IncompatibleAdapterError
from .experts import is_fused_experts
from .kernels.bank import SlotBank
from .layers import LINEAR_TYPES, copy_pair, pair_pieces
from .mapping import ForwardContext


def routers_of(children: Iterable[Tuple[str, nn.Module]]) -> list:
    """The names of the routers among one MoE block's children: beside exactly one fused-experts
    module, a child that is not a linear layer and holds a 2-D `weight` of [num_experts, hidden]."""
    children = list(children)
    experts = [m for _, m in children if is_fused_experts(m)]
    if len(experts) != 1:
        return []
    return [name for name, child in children
            if not isinstance(child, LINEAR_TYPES) and isinstance(getattr(child, "weight", None), nn.Parameter)
            and child.weight.dim() == 2 and child.weight.shape[0] == experts[0].num_experts]


def find_routers(model: nn.Module) -> set:
    """Qualified names of every MoE router in `model` (see `routers_of`)."""
    return {f"{block_name}.{name}" if block_name else name
            for block_name, block in model.named_modules() for name in routers_of(block.named_children())}


_CASTS = (torch.Tensor.to, torch.Tensor.type, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half,
          torch.Tensor.bfloat16, torch.Tensor.contiguous)


class _AddDelta(TorchFunctionMode):
    """Adds `delta(x)` to the output of every `F.linear(x, w, ...)` whose `w` is `weight`, or a cast or
    copy of it (DeepSeek-V3's router applies `self.weight.type(torch.float32)`)."""

    def __init__(self, weight: torch.Tensor, delta) -> None:
        super().__init__()
        self.weights, self.delta, self.applied = [weight], delta, 0

    def _is_weight(self, t) -> bool:
        return any(t is w for w in self.weights)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear and len(args) > 1 and self._is_weight(args[1]):
            self.applied += 1
            out = out + self.delta(args[0]).to(out.dtype)
        elif func in _CASTS and args and self._is_weight(args[0]) and isinstance(out, torch.Tensor):
            self.weights.append(out)
        return out


class MultiLoRARouter(nn.Module):
    """A MoE router whose logits take each token's LoRA delta; slot views as in `MultiLoRALinear`."""

    def __init__(self, base_layer: nn.Module, num_slots: int, context: ForwardContext, backend,
                 compute_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype if weight.dtype.is_floating_point or compute_dtype is None else compute_dtype
        self.bank = SlotBank(num_slots, self.in_features, self.out_features, weight.device, self.dtype)
        self.context, self.backend = context, backend

    def slot_pieces(self, w) -> dict:
        return pair_pieces(w, self.in_features, self.out_features, self.dtype, self.bank.device)

    def bind(self, slot: int, views: dict) -> None:
        self.bank.bind(slot, views.get("a"), views.get("b"))

    def write_slot(self, slot: int, w, views: dict, non_blocking: bool = False) -> None:
        self.bind(slot, views)
        copy_pair(views, w, non_blocking)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        mapping = self.context.mapping
        if mapping is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        tokens = mapping.tokens(hidden_states.numel() // self.in_features, hidden_states.device)
        if not any(self.bank.host_ranks[s] for s, _, _ in tokens.segments):
            return self.base_layer(hidden_states, *args, **kwargs)

        def delta(x: torch.Tensor) -> torch.Tensor:  # [..., in] → [..., out]
            x2 = x.reshape(-1, self.in_features).to(self.dtype)  # [T, in]
            out = torch.zeros(x2.shape[0], self.out_features, device=x.device, dtype=self.dtype)
            self.backend.add_lora(out, x2, self.bank, tokens)
            return out.view(*x.shape[:-1], self.out_features)

        mode = _AddDelta(self.base_layer.weight, delta)
        with mode:
            out = self.base_layer(hidden_states, *args, **kwargs)
        if not mode.applied:
            raise IncompatibleAdapterError(
                f"the router {type(self.base_layer).__name__} did not apply its weight through F.linear, so "
                "LoRA on its `weight` cannot be served; leave the router out of the adapter's target_parameters"
            )
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
