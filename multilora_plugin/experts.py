"""LoRA on fused MoE experts: PEFT's `target_parameters` on `experts.gate_up_proj` / `experts.down_proj`.

transformers 5 keeps a MoE layer's experts as 3-D parameters in one module (Mixtral, Qwen2/3-MoE,
OLMoE, gpt-oss, DeepSeek, ...: every class decorated with `use_experts_implementation`, which also
says how its weights are laid out: `has_gate`, `is_transposed`, `has_bias`, `_apply_gate`). A PEFT
adapter trained on them holds, per targeted parameter, one A/B pair for every expert; expert e's
projection becomes

    proj_e(x) = base_e(x) + scale * B_e @ A_e @ x          A_e: [r, in], B_e: [out, r]

`MultiLoRAExperts` keeps the experts module as `base_layer` and one `ExpertsLoRA` per targeted
parameter: every expert's pair of every slot (views into slot memory at the adapter's rank), seen by
the kernels as `S * E` virtual slots (slot s, expert e → s * E + e). A forward in which no token has an adapter for these experts runs
the model's own experts implementation (eager, grouped_mm, batched_mm, ...) untouched. Otherwise the
routed (token, expert) pairs are sorted by expert, each projection is the base matmul of each
expert's run of pairs plus the LoRA delta of each pair's (slot, expert), grouped by virtual slot as
in SGMV: the LoRA cost grows with the pairs routed, not with experts × adapters.

Running example, E = 4 experts, top-2, two tokens: token 0 of slot 1 routed to experts (2, 0),
token 1 of the base model routed to (0, 3):
    pairs (token, expert) = (0, 2), (0, 0), (1, 0), (1, 3)
    sorted by expert      = (0, 0), (1, 0), (0, 2), (1, 3)      counts per expert = [2, 0, 1, 1]
    virtual slots         = [1 * 4 + 0, -1, 1 * 4 + 2, -1] = [4, -1, 6, -1]
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import IncompatibleAdapterError
from .kernels.bank import SlotBank
from .layers import copy_pair, pair_pieces
from .mapping import ForwardContext, grouped_token_mapping


def is_fused_experts(module: nn.Module) -> bool:
    """Whether `module` is a transformers fused-experts module (`use_experts_implementation`)."""
    if isinstance(module, MultiLoRAExperts) or not all(
            hasattr(module, a) for a in ("has_gate", "is_transposed", "has_bias", "num_experts")):
        return False
    up = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == down.dim() == 3


def projection_names(experts: nn.Module) -> tuple:
    """The 3-D parameters LoRA can target, in definition order (the order PEFT nests its wrappers in)."""
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    return tuple(n for n, _ in experts.named_parameters(recurse=False) if n in (up, "down_proj"))


def projection_shape(experts: nn.Module, name: str) -> tuple:
    """(num_experts, in_features, out_features) of one projection: [E, out, in], or [E, in, out]
    when the module says `is_transposed` (gpt-oss)."""
    num, d1, d2 = getattr(experts, name).shape
    return (num, d1, d2) if experts.is_transposed else (num, d2, d1)


class ExpertsLoRA(nn.Module):
    """The slot views of one expert projection: every expert's A/B of every slot, as a `SlotBank` of
    `S * E` virtual slots."""

    def __init__(self, num_slots: int, num_experts: int, in_features: int, out_features: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.out_features, self.dtype = num_experts, in_features, out_features, dtype
        self.bank = SlotBank(num_slots * num_experts, in_features, out_features, device, dtype)
        self.slot_ranks = [0] * num_slots  # rank per (real) slot, 0 = the slot's adapter leaves it alone

    def slot_pieces(self, w) -> dict:
        """"a" [E, r, in] and "b" [E, r, out] (B transposed) at the adapter's rank."""
        return pair_pieces(w, self.in_features, self.out_features, self.dtype, self.bank.device)

    def bind(self, slot: int, views: dict) -> None:
        a, b = views.get("a"), views.get("b")
        for e in range(self.num_experts):
            self.bank.bind(slot * self.num_experts + e, None if a is None else a[e], None if b is None else b[e])
        self.slot_ranks[slot] = 0 if a is None else a.shape[1]

    @torch.no_grad()
    def write_slot(self, slot: int, w, views: dict, non_blocking: bool = False) -> None:
        """Put an adapter's `a` [E, r, in] and scaled `b` [E, out, r] in `slot`'s views; none empties it."""
        self.bind(slot, views)
        copy_pair(views, w, non_blocking)


class MultiLoRAExperts(nn.Module):
    """A fused-experts module whose projections take each token's adapter, per routed expert."""

    def __init__(self, base_layer: nn.Module, num_slots: int, context: ForwardContext, backend,
                 compute_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_experts = base_layer.num_experts
        self.context, self.backend = context, backend
        self._signature = inspect.signature(base_layer.forward)  # how the model passes the routing
        self.lora = nn.ModuleDict()
        for name in projection_names(base_layer):
            weight = getattr(base_layer, name)
            dtype = weight.dtype if weight.dtype.is_floating_point or compute_dtype is None else compute_dtype
            num, in_features, out_features = projection_shape(base_layer, name)
            self.lora[name] = ExpertsLoRA(num_slots, num, in_features, out_features, weight.device, dtype)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mapping = self.context.mapping
        if mapping is not None:
            tokens = mapping.tokens(hidden_states.shape[0], hidden_states.device)
            if any(lora.slot_ranks[s] for lora in self.lora.values() for s, _, _ in tokens.segments):
                top_k_index, top_k_weights = self._routing(hidden_states, args, kwargs)
                return self._routed(hidden_states, top_k_index, top_k_weights, tokens.token_slots)
        return self.base_layer(hidden_states, *args, **kwargs)  # the model's own experts implementation

    def _routing(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> tuple:
        """(top_k_index [T, K], top_k_weights [T, K]) from the call, by position or by the names the
        experts class gives them."""
        try:
            bound = self._signature.bind(hidden_states, *args, **kwargs)
        except TypeError:
            bound = None
        values = list(bound.arguments.values()) if bound is not None else []
        if len(values) != 3 or not all(isinstance(v, torch.Tensor) for v in values):
            raise IncompatibleAdapterError(
                f"expected the experts {type(self.base_layer).__name__} to be called with (hidden_states, "
                f"top_k_index, top_k_weights), but got {len(args)} more positional and {sorted(kwargs)} keyword "
                "arguments; LoRA on these experts cannot be applied"
            )
        return values[1], values[2]

    def _routed(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                token_slots: torch.Tensor) -> torch.Tensor:
        experts, num_experts = self.base_layer, self.num_experts
        num_tokens, top_k = top_k_index.shape  # [T, K]
        expert_ids = top_k_index.reshape(-1)  # [P], P = T * K pairs
        order = torch.argsort(expert_ids, stable=True)  # pairs grouped by expert
        pair_tokens = order // top_k  # [P]
        sorted_experts = expert_ids[order]
        counts = torch.bincount(sorted_experts, minlength=num_experts).tolist()  # one host sync per layer
        slots = token_slots[pair_tokens].long()  # [P]
        virtual = torch.where(slots >= 0, slots * num_experts + sorted_experts, -1)
        pairs = grouped_token_mapping(virtual)
        x = hidden[pair_tokens]  # [P, H], grouped by expert
        if experts.has_gate:
            h = experts._apply_gate(self._project("gate_up_proj", x, counts, pairs))
        else:
            h = experts.act_fn(self._project("up_proj", x, counts, pairs))
        out = self._project("down_proj", h, counts, pairs)  # [P, H]
        if getattr(experts, "has_post_expert_norm", False):
            out = experts.post_expert_norm(out)
        out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)  # [T, H]

    def _project(self, name: str, x: torch.Tensor, counts: list, pairs) -> torch.Tensor:
        """Every pair's expert projection (x is grouped by expert, `counts` pairs each), plus its LoRA."""
        experts = self.base_layer
        weight = getattr(experts, name)  # [E, out, in] ([E, in, out] transposed)
        bias = getattr(experts, f"{name}_bias", None) if experts.has_bias else None
        parts, start = [], 0
        for e, n in enumerate(counts):
            if n:
                xs = x[start:start + n]
                y = xs @ weight[e] if experts.is_transposed else F.linear(xs, weight[e])  # [n, out]
                parts.append(y if bias is None else y + bias[e])
            start += n
        y = torch.cat(parts)  # [P, out]
        lora = self.lora[name] if name in self.lora else None
        if lora is not None and pairs.segments:
            self.backend.add_lora(y, x.to(lora.dtype), lora.bank, pairs)
        return y

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, projections={list(self.lora)}"
