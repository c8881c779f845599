"""The input embedding, per row: LoRA on it (PEFT's `lora_embedding_A/B`) and trainable tokens (PEFT's
`trainable_token_indices`: new rows for some token ids, the rest of the vocabulary untouched).

    LoRA:              y[t] = E[id_t] + scale * B @ A[:, id_t]           A: [r, vocab], B: [dim, r]
    trainable tokens:  y[t] = values[j]    where id_t == indices[j]      values: [n, dim]
    DoRA:              y[t] = g * (E[id_t] + scale * B @ A[:, id_t])   g = m / ||E^T + scale * B @ A||_row  [dim]

`MultiLoRAEmbedding` keeps the embedding as `base_layer`. Each slot's pieces are views into slot memory
at the adapter's own sizes: its LoRA A stored transposed ([vocab, r], so a token's row is one lookup)
and Bᵀ [r, dim] (a `SlotBank`, so the expand is the kernels' `lora_expand` over the same per-token
mapping as every layer), its trainable tokens (ids [n], values [n, dim]) and DoRA's g - 1 [dim]. DoRA's
gain g depends only on the embedding and the adapter: it is computed when the slot is written and
folded into the slot's B; the base rows of the slot's tokens are rescaled by it, as `MultiLoRALinear`
does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .dora import gain
from .kernels.bank import SlotBank
from .mapping import ForwardContext


class MultiLoRAEmbedding(nn.Module):
    """An `nn.Embedding` whose rows take each token's adapter."""

    def __init__(self, base_layer: nn.Embedding, num_slots: int, context: ForwardContext, backend,
                 compute_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        weight = base_layer.weight
        self.dtype = weight.dtype if weight.dtype.is_floating_point or compute_dtype is None else compute_dtype
        self.bank = SlotBank(num_slots, self.num_embeddings, self.embedding_dim, weight.device, self.dtype)
        self.lookup: list = [None] * num_slots  # per slot: A transposed, [vocab, r], or None
        self.gains: list = [None] * num_slots  # per slot: DoRA's g - 1 [dim], or None
        self.token_rows: list = [None] * num_slots  # per slot: (indices [n] int64, values [n, dim]) or None
        self.context, self.backend = context, backend

    def slot_pieces(self, w) -> dict:
        device, rank = self.bank.device, w.rank
        pieces = {}
        if rank:
            pieces["a"] = ((self.num_embeddings, rank), self.dtype, device)
            pieces["b"] = ((rank, self.embedding_dim), self.dtype, device)
            if "magnitude" in w.extra:
                pieces["gain"] = ((self.embedding_dim,), self.dtype, device)
        if "token_indices" in w.extra:
            n = w.extra["token_indices"].shape[0]
            pieces["token_indices"] = ((n,), torch.int64, device)
            pieces["token_values"] = ((n, self.embedding_dim), self.dtype, device)
        return pieces

    def bind(self, slot: int, views: dict) -> None:
        self.bank.bind(slot, None, views.get("b"))
        self.lookup[slot], self.gains[slot] = views.get("a"), views.get("gain")
        self.token_rows[slot] = (views["token_indices"], views["token_values"]) if "token_indices" in views else None

    @torch.no_grad()
    def write_slot(self, slot: int, w, views: dict, non_blocking: bool = False) -> None:
        """An adapter's weights for the embedding (`a` [r, vocab], scaled `b` [dim, r], "token_indices"
        [n] and "token_values" [n, dim]: trainable tokens, "magnitude" [dim]: DoRA's) into the slot's
        `views`; None empties the slot."""
        self.bind(slot, views)
        if "a" in views:
            views["a"].copy_(w.a.T, non_blocking=non_blocking)
            views["b"].copy_(w.b.T, non_blocking=non_blocking)
        if "gain" in views:  # the embedding as a linear map vocab -> dim: W^T [dim, vocab]
            g = gain(self.base_layer.weight.T, views["a"].T, views["b"].T, w.extra["magnitude"])
            views["b"].mul_(g.unsqueeze(0).to(self.dtype))
            views["gain"].copy_(g - 1)
        if "token_indices" in views:
            views["token_indices"].copy_(w.extra["token_indices"], non_blocking=non_blocking)
            views["token_values"].copy_(w.extra["token_values"], non_blocking=non_blocking)

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(ids, *args, **kwargs)
        mapping = self.context.mapping
        if mapping is None:
            return y
        flat = ids.reshape(-1)  # [T]
        tokens = mapping.tokens(flat.shape[0], ids.device)
        lora = [seg for seg in tokens.segments if self.bank.host_ranks[seg[0]]]
        rows = [seg for seg in tokens.segments if self.token_rows[seg[0]] is not None]
        if not (lora or rows):
            return y
        y2 = y.view(-1, self.embedding_dim)  # [T, dim], a view: the delta lands in y
        for slot, start, end in lora:  # DoRA's rescale of the base rows, before the delta
            if self.gains[slot] is not None:
                picked = tokens.index[start:end].long()
                y2[picked] += self.gains[slot].to(y2.dtype) * y2[picked]
        if lora:
            h = torch.zeros(flat.shape[0], self.bank.max_rank(s for s, _, _ in lora), device=y.device,
                            dtype=torch.float32)  # [T, R]
            for slot, start, end in lora:
                picked = tokens.index[start:end]
                r = self.bank.host_ranks[slot]
                h[picked, :r] = self.lookup[slot][flat[picked]].float()  # [n, r]: A's column of each token's id
            self.backend.lora_expand(y2, h, self.bank, tokens)
        for slot, start, end in rows:
            indices, values = self.token_rows[slot]
            picked = tokens.index[start:end].long()
            match = flat[picked].unsqueeze(1) == indices.unsqueeze(0)  # [n, k]
            hit = match.any(dim=1)
            y2[picked[hit]] = values[match[hit].float().argmax(dim=1)].to(y2.dtype)
        return y

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"
