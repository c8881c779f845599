"""`SlotBank`: the LoRA pairs of one linear map, one per slot, each at its own rank (nothing padded).

Slot s holds A_s [r_s, in] and Bᵀ_s [r_s, out] (scaling folded in), both row-major, anywhere in one
1-D `storage` tensor (the slot memory's pool; `slot_memory.py` places them). The torch path reads
the per-slot views; the Triton kernels read `storage` at the per-slot element offsets:

    A_s[i, k]  = storage[a_offsets[s] + i * in + k]        0 <= i < ranks[s]
    Bᵀ_s[i, n] = storage[b_offsets[s] + i * out + n]

A slot of rank 0 (empty, or an adapter that leaves this module alone) is never read.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class SlotBank:
    """Per-slot A / Bᵀ views of one linear map (in → out), their ranks and offsets, host and device."""

    def __init__(self, num_slots: int, in_features: int, out_features: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.a: list = [None] * num_slots  # [r, in] views, or None
        self.b: list = [None] * num_slots  # [r, out] views (B transposed), or None
        self.host_ranks = [0] * num_slots
        self.ranks = torch.zeros(num_slots, device=device, dtype=torch.int32)
        self.a_offsets = torch.zeros(num_slots, device=device, dtype=torch.int64)
        self.b_offsets = torch.zeros(num_slots, device=device, dtype=torch.int64)
        self.storage: Optional[torch.Tensor] = None  # the 1-D tensor every view lives in

    @property
    def num_slots(self) -> int:
        return len(self.a)

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    def bind(self, slot: int, a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> None:
        """Make `a` [r, in] and `b` [r, out] (views of one 1-D storage) slot `slot`'s pair; `b` None
        empties it. (An embedding binds only its `b`: it looks its A up itself.)"""
        rank = 0 if b is None else b.shape[0]
        self.a[slot], self.b[slot] = (a, b) if rank else (None, None)
        self.host_ranks[slot] = rank
        self.ranks[slot] = rank
        if rank:
            untyped = b.untyped_storage()
            if self.storage is None or self.storage.untyped_storage().data_ptr() != untyped.data_ptr():
                # the whole storage as one 1-D tensor (a view's `_base` is not kept in inference mode)
                self.storage = torch.empty(0, dtype=b.dtype, device=b.device).set_(untyped)
            if a is not None:
                self.a_offsets[slot] = a.storage_offset()
            self.b_offsets[slot] = b.storage_offset()

    def max_rank(self, slots: Sequence[int]) -> int:
        return max((self.host_ranks[s] for s in slots), default=0)

    def views_bytes(self) -> int:
        """Memory the slots' pairs take (their views, not the storage)."""
        return sum(t.numel() * t.element_size() for t in (*self.a, *self.b) if t is not None)

    @classmethod
    def from_padded(cls, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor) -> "SlotBank":
        """A bank holding the pairs of padded slot tensors (`lora_a` [S, R, in], `lora_b` [S, out, R],
        `ranks` [S]), packed one after the other in one storage: how tests and benchmarks build one."""
        num_slots, _, d_in = lora_a.shape
        d_out = lora_b.shape[1]
        bank = cls(num_slots, d_in, d_out, lora_a.device, lora_a.dtype)
        host = [int(r) for r in ranks.tolist()]
        storage = torch.empty(sum(host) * (d_in + d_out), device=lora_a.device, dtype=lora_a.dtype)
        start = 0
        for slot, r in enumerate(host):
            a = storage[start:start + r * d_in].view(r, d_in)
            start += r * d_in
            b = storage[start:start + r * d_out].view(r, d_out)
            start += r * d_out
            a.copy_(lora_a[slot, :r])
            b.copy_(lora_b[slot, :, :r].T)
            bank.bind(slot, a, b)
        return bank
