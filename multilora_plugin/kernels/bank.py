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

from .stack import Stack


class SlotBank:
    """Per-slot A / Bᵀ views of one linear map (in → out), their ranks and offsets, host and device."""

    def __init__(self, num_slots: int, in_features: int, out_features: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.a: list = [None] * num_slots  # [r, in] views, or None
        self.b: list = [None] * num_slots  # [r, out] views (B transposed), or None
        self.host_ranks = [0] * num_slots
        self._host_offsets = ([0] * num_slots, [0] * num_slots)
        # the kernels' tables on the device, updated in place (CUDA graphs keep their addresses) by `flush`
        self._ranks = torch.zeros(num_slots, device=device, dtype=torch.int32)
        self._offsets = torch.zeros(2, num_slots, device=device, dtype=torch.int64)
        self._stale = False
        self.storage: Optional[torch.Tensor] = None  # the 1-D tensor every view lives in
        self.stack = Stack()  # the batch's pairs stacked, kept from step to step (the torch path's)

    @property
    def num_slots(self) -> int:
        return len(self.a)

    @property
    def device(self) -> torch.device:
        return self._ranks.device

    @property
    def ranks(self) -> torch.Tensor:
        """[S] int32 on the device."""
        self.flush()
        return self._ranks

    @property
    def a_offsets(self) -> torch.Tensor:
        """[S] int64 on the device: where each slot's A starts in `storage`."""
        self.flush()
        return self._offsets[0]

    @property
    def b_offsets(self) -> torch.Tensor:
        self.flush()
        return self._offsets[1]

    def flush(self) -> None:
        """Bring the device tables up to date with the host's (one copy per table, after any binds)."""
        if self._stale:
            self._ranks.copy_(torch.tensor(self.host_ranks, dtype=torch.int32))
            self._offsets.copy_(torch.tensor(self._host_offsets, dtype=torch.int64))
            self._stale = False

    def bind(self, slot: int, a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> None:
        """Make `a` [r, in] and `b` [r, out] (views of one 1-D storage) slot `slot`'s pair; `b` None
        empties it. (An embedding binds only its `b`: it looks its A up itself.)"""
        rank = 0 if b is None else b.shape[0]
        self.stack.forget(slot)
        self.a[slot], self.b[slot] = (a, b) if rank else (None, None)
        self.host_ranks[slot] = rank
        self._stale = True
        if rank:
            untyped = b.untyped_storage()
            if self.storage is None or self.storage.untyped_storage().data_ptr() != untyped.data_ptr():
                # the whole storage as one 1-D tensor (a view's `_base` is not kept in inference mode)
                self.storage = torch.empty(0, dtype=b.dtype, device=b.device).set_(untyped)
            if a is not None:
                self._host_offsets[0][slot] = a.storage_offset()
            self._host_offsets[1][slot] = b.storage_offset()

    def stacked(self, slots: tuple) -> tuple:
        """(A [Σr, in], Bᵀ [Σr, out], ((owner slot, rank), ...) per block of rows): the pairs of `slots`
        stacked. Pairs of one rank go through `stack`, kept from step to step (its free blocks and those
        of adapters not in `slots` are owned by no token of this batch); mixed ranks are concatenated."""
        ranks = [self.host_ranks[s] for s in slots]
        if min(ranks) == max(ranks):
            a, b, owners = self.stack.gather(self, slots)
            return a, b, tuple((owner, ranks[0]) for owner in owners)
        return (torch.cat([self.a[s] for s in slots]), torch.cat([self.b[s] for s in slots]),
                tuple(zip(slots, ranks)))

    def copy_bytes(self, slots: tuple) -> int:
        """What `stacked(slots)` would copy."""
        ranks = {self.host_ranks[s] for s in slots}
        count = self.stack.missing(slots, ranks.pop()) if len(ranks) == 1 else len(slots)
        rank = max(self.host_ranks[s] for s in slots)
        return count * rank * (self.in_features + self.out_features) * self.storage.element_size()

    def max_rank(self, slots: Sequence[int]) -> int:
        return max((self.host_ranks[s] for s in slots), default=0)

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
