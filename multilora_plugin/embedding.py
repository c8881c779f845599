"""The input embedding, per row: LoRA on it (PEFT's `lora_embedding_A/B`) and trainable tokens (PEFT's
`trainable_token_indices`: new rows for some token ids, the rest of the vocabulary untouched).

    LoRA:              y[t] = E[id_t] + scale * B @ A[:, id_t]           A: [r, vocab], B: [dim, r]
    trainable tokens:  y[t] = values[j]    where id_t == indices[j]      values: [n, dim]
    DoRA:              y[t] = g * (E[id_t] + scale * B @ A[:, id_t])   g = m / ||E^T + scale * B @ A||_row  [dim]

`MultiLoRAEmbedding` keeps the embedding as `base_layer`. The LoRA A of every slot is stored transposed
(`lora_a [S, vocab, R]`), so a token's row is one lookup; the expand is the kernels' `lora_expand`
over the same per-token mapping as every layer. Those buffers are allocated when the first adapter with
LoRA on the embedding is written. Each slot's trainable tokens are an (indices, values) pair on the
device, written with the slot. DoRA's gain g depends only on the embedding and the adapter: it is
computed when the slot is written, folded into the slot's B, and `row_gain [S + 1, dim]` holds g - 1
for the base rows (row S stays zero: slot -1 reads it), as `MultiLoRALinear` does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .dora import gain
from .mapping import ForwardContext


class MultiLoRAEmbedding(nn.Module):
    """An `nn.Embedding` whose rows take each token's adapter."""

    def __init__(self, base_layer: nn.Embedding, max_loras: int, max_lora_rank: int, context: ForwardContext, backend,
                 compute_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point or compute_dtype is None else compute_dtype
        # [S, vocab, R] (A transposed) and [S, dim, R], allocated when the first adapter with LoRA on the
        # embedding is written: vocab x R per slot is more than most adapters hold in all
        self.max_lora_rank = max_lora_rank
        self.register_buffer("lora_a", torch.zeros(max_loras, self.num_embeddings, 0, device=weight.device,
                                                   dtype=dtype), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, self.embedding_dim, 0, device=weight.device,
                                                   dtype=dtype), persistent=False)
        self.register_buffer("lora_ranks", torch.zeros(max_loras, device=weight.device, dtype=torch.int32),
                             persistent=False)  # [S]
        self.register_buffer("row_gain", torch.zeros(max_loras + 1, 0, device=weight.device, dtype=dtype),
                             persistent=False)  # [S + 1, dim] once an adapter with DoRA is written
        self.host_ranks = [0] * max_loras
        self.host_dora = [False] * max_loras
        self.token_rows: list = [None] * max_loras  # per slot: (indices [n] int64, values [n, dim]) or None
        self.context, self.backend = context, backend

    @torch.no_grad()
    def write_slot(self, slot: int, a: Optional[torch.Tensor], b: Optional[torch.Tensor], non_blocking: bool = False,
                   token_indices: Optional[torch.Tensor] = None, token_values: Optional[torch.Tensor] = None,
                   magnitude: Optional[torch.Tensor] = None) -> None:
        """`a` [r, vocab], scaled `b` [dim, r] (None: no LoRA here); `token_indices` [n] and
        `token_values` [n, dim]: the slot's trainable tokens (None: none); `magnitude` [dim]: DoRA's."""
        rank = 0 if a is None else a.shape[0]
        if rank and not self.lora_a.shape[2]:
            self.lora_a = self.lora_a.new_zeros(*self.lora_a.shape[:2], self.max_lora_rank)
            self.lora_b = self.lora_b.new_zeros(*self.lora_b.shape[:2], self.max_lora_rank)
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if rank:
            self.lora_a[slot, :, :rank].copy_(a.T, non_blocking=non_blocking)
            self.lora_b[slot, :, :rank].copy_(b, non_blocking=non_blocking)
        self.lora_ranks[slot].fill_(rank)
        self.host_ranks[slot] = rank
        dora = magnitude is not None and rank > 0
        if dora and not self.row_gain.shape[1]:
            self.row_gain = self.row_gain.new_zeros(self.row_gain.shape[0], self.embedding_dim)
        if self.row_gain.shape[1]:
            self.row_gain[slot].zero_()
        if dora:  # the embedding as a linear map vocab -> dim: W^T [dim, vocab]
            g = gain(self.base_layer.weight.T, self.lora_a[slot, :, :rank].T, self.lora_b[slot, :, :rank], magnitude)
            self.lora_b[slot, :, :rank].mul_(g.unsqueeze(1).to(self.lora_b.dtype))
            self.row_gain[slot].copy_(g - 1)
        self.host_dora[slot] = dora
        device = self.lora_a.device
        self.token_rows[slot] = None if token_indices is None else (
            token_indices.to(device, torch.int64, non_blocking=non_blocking),
            token_values.to(device, self.lora_b.dtype, non_blocking=non_blocking))

    def slot_bytes(self) -> int:
        """The slot buffers (the LoRA ones once allocated); trainable tokens take memory only in the
        slots that hold some."""
        return sum(t.numel() * t.element_size() for t in (self.lora_a, self.lora_b, self.lora_ranks, self.row_gain))

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(ids, *args, **kwargs)
        mapping = self.context.mapping
        if mapping is None:
            return y
        flat = ids.reshape(-1)  # [T]
        tokens = mapping.tokens(flat.shape[0], ids.device)
        lora = [seg for seg in tokens.segments if self.host_ranks[seg[0]]]
        rows = [seg for seg in tokens.segments if self.token_rows[seg[0]] is not None]
        if not (lora or rows):
            return y
        y2 = y.view(-1, self.embedding_dim)  # [T, dim], a view: the delta lands in y
        if any(self.host_dora[seg[0]] for seg in lora):  # DoRA's rescale of the base rows, before the delta
            y2.add_(self.row_gain[tokens.token_slots.long()].to(y2.dtype) * y2)
        if lora:
            h = torch.zeros(flat.shape[0], self.lora_a.shape[2], device=y.device, dtype=torch.float32)  # [T, R]
            for slot, start, end in lora:
                picked = tokens.index[start:end]
                h[picked] = self.lora_a[slot, flat[picked]].float()  # [n, R]: A's column of each token's id
            self.backend.lora_expand(y2, h, self.lora_b, self.lora_ranks, tokens)
        for slot, start, end in rows:
            indices, values = self.token_rows[slot]
            picked = tokens.index[start:end].long()
            match = flat[picked].unsqueeze(1) == indices.unsqueeze(0)  # [n, k]
            hit = match.any(dim=1)
            y2[picked[hit]] = values[match[hit].float().argmax(dim=1)].to(y2.dtype)
        return y

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"
