"""PEFT's `modules_to_save`: an adapter that trained a whole module (an `lm_head`, a classifier's
`score`, the `embed_tokens`) holds a full copy of it. Each row runs through its own adapter's copy; rows
of other adapters and base rows run through the module itself.

`MultiLoRASaved` keeps the module as `base_layer`, which may itself be a multi-LoRA layer (other
adapters' LoRA on the same module), and per slot the copy's parameters on the device, written with the
slot (None: that slot's rows take the base output). Only modules that work token by token are copied
(linear layers, embeddings, norms): a token's output depends on that token alone, so the tokens of a
copy's slot are gathered, run through the original module with the copy's parameters
(`torch.func.functional_call`) and scattered back over the base output.

    y = base_layer(x);   y[tokens of slot s] = original(x[tokens of slot s]; parameters of copy s)

On a model whose output embedding is tied to the input embedding, an adapter's trainable tokens change
both (as PEFT ties them): the output embedding's copy is then sparse, only the new tokens' rows of its
weight, and their logits are computed alone:  y[tokens of slot s, ids] = x[tokens of slot s] @ values.T
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from .adapters.checkpoint import SUFFIX
from .mapping import ForwardContext

__all__ = ["SUFFIX", "MultiLoRASaved", "copied_modules", "per_token", "saved_parameters"]
HEADS = ("score", "classifier")  # the classification heads PEFT saves for SEQ_CLS adapters


def per_token(module: nn.Module) -> bool:
    """Whether each token's output of `module` depends on that token alone, as a copy needs."""
    return isinstance(module, (nn.Linear, Conv1D, nn.Embedding, nn.LayerNorm)) or type(module).__name__.endswith(
        "RMSNorm")


def copied_modules(model: nn.Module, choice, input_embedding: Optional[str], output_embedding: Optional[str],
                   resolve: Callable[[nn.Module], nn.Module] = lambda m: m) -> dict:
    """{name: module} of the modules whose per-adapter copies are served, as
    `MultiLoRAConfig.modules_to_save` chooses them: "auto" (the input and output embeddings and a classification head, where they work
    token by token), names or suffixes (PEFT's rule), or none. `resolve` gives the module that a
    name stands for (a PEFT wrapper's base module)."""
    if not choice:
        return {}
    found = {}
    for name, module in model.named_modules():
        module = resolve(module)
        if choice == "auto":
            picked = per_token(module) and (name in (input_embedding, output_embedding) or name in HEADS)
        else:
            picked = any(name == t or name.endswith(f".{t}") for t in choice)
        if picked and not any(name.startswith(f"{n}.") for n in found):
            found[name] = module
    return found


def saved_parameters(module: nn.Module) -> dict:
    """{parameter name: (shape, dtype)} that a copy of `module` holds."""
    return {n: (tuple(p.shape), p.dtype) for n, p in module.named_parameters()}


class MultiLoRASaved(nn.Module):
    """A module whose rows take their adapter's full copy of it, if that adapter saved one."""

    def __init__(self, base_layer: nn.Module, original: nn.Module, num_slots: int, context: ForwardContext,
                 head: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        # the module whose parameters a copy replaces: base_layer itself or the one a LoRA layer wraps
        # (not registered again as a submodule, so the state dict names it once)
        object.__setattr__(self, "original", original)
        self.copies: list = [None] * num_slots  # per slot: {parameter name: tensor} or None
        self.columns: list = [None] * num_slots  # per slot: tied trainable tokens (ids [n], rows [n, in]) or None
        self.context = context
        self.head = head  # the output embedding: in transformers' continuous batching it sees the kept rows only

    def __getattr__(self, name: str):  # `weight`, `num_embeddings`, ... of the module it stands for
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "original"):
                raise
            return getattr(self.base_layer, name)

    def slot_pieces(self, w) -> dict:
        """A copy's parameters at their own shapes and dtypes, or the ids [n] and rows [n, in] of tied
        trainable tokens."""
        if w.a is not None or w.b is not None:
            raise ValueError("a module copy holds no LoRA pair")
        weight = self.original.weight
        pieces = {}
        for name, t in w.extra.items():
            if name == "token_indices":
                pieces[name] = (tuple(t.shape), torch.int64, weight.device)
            elif name == "token_values":
                pieces[name] = (tuple(t.shape), weight.dtype, weight.device)
            else:
                own = self.original.get_parameter(name)
                pieces[name] = (tuple(t.shape), own.dtype, own.device)
        return pieces

    def bind(self, slot: int, views: dict) -> None:
        views = dict(views)
        ids, rows = views.pop("token_indices", None), views.pop("token_values", None)
        self.columns[slot] = None if ids is None else (ids, rows)
        self.copies[slot] = views or None

    @torch.no_grad()
    def write_slot(self, slot: int, w, views: dict, non_blocking: bool = False) -> None:
        """Put an adapter's copy ({parameter name: tensor}, as saved) in `slot`'s views, or the rows its
        tied trainable tokens give the output embedding ("token_indices" [n], "token_values" [n, in]);
        None empties it."""
        self.bind(slot, views)
        for name, view in views.items():
            view.copy_(w.extra[name], non_blocking=non_blocking)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        mapping = self.context.mapping
        if mapping is None:
            return y  # the batch's slots that hold a copy are found below, not by a scan of every slot
        x2 = x.reshape(-1) if isinstance(self.original, nn.Embedding) else x.reshape(-1, x.shape[-1])
        tokens = (mapping.head_tokens if self.head else mapping.tokens)(x2.shape[0], x.device)
        segments = [seg for seg in tokens.segments if self.copies[seg[0]] is not None
                    or self.columns[seg[0]] is not None]
        if not segments:
            return y
        y = y.contiguous()
        y2 = y.view(x2.shape[0], -1)  # [T, out], a view: the copies' rows land in y
        for slot, start, end in segments:
            picked = tokens.index[start:end].long()
            if self.copies[slot] is not None:
                y2[picked] = self._run_copy(self.copies[slot], x2[picked], args, kwargs).to(y2.dtype)
                continue
            ids, rows = self.columns[slot]
            logits = x2[picked].to(rows.dtype) @ rows.T  # [n, k]
            if getattr(self.original, "bias", None) is not None:
                logits = logits + self.original.bias[ids]
            y2[picked.unsqueeze(1), ids.unsqueeze(0)] = logits.to(y2.dtype)
        return y

    def _run_copy(self, params: dict, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The original module on `x` with a copy's parameters; a plain nn.Linear (an LM head, a
        classifier) directly, which saves `functional_call`'s re-parametrisation on every step."""
        if type(self.original) is nn.Linear and not args and not kwargs:
            bias = params.get("bias", self.original.bias)
            return F.linear(x, params.get("weight", self.original.weight), bias)
        return functional_call(self.original, params, (x, *args), kwargs)

    def extra_repr(self) -> str:
        return f"slots={len(self.copies)}"
