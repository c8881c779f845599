"""`Stack`: one layer's pairs of the batch's adapters, one after the other, kept from step to step.

The torch path's stacked shape of work multiplies every token by the A and Bᵀ of every adapter of the
batch at once, so it needs them as two matrices, `[k * r, in]` and `[k * r, out]`. Building them is a
copy of the batch's weights: on a CPU, more than the two matmuls on them cost. Between decode steps
the batch's adapters change by a few at a time, so the stack keeps its blocks (one per adapter, all of
one rank) and copies only the pairs it lacks, into the blocks of adapters that left the batch (it is
built anew when they do not fit, or when it holds more than 1.5x the batch's blocks). A block
whose slot is written again is freed at once. Free blocks are zero and owned by no slot (-2: never a
token's slot), so the mask that keeps each token's own adapter's columns drops them.

Running example, rank 1: the batch needs slots (3, 5); then (5, 7); then (5, 7) again:
    owners (3, 5)      copy 3 and 5
    owners (7, 5)      7 takes the block of 3, which left the batch: one pair copied
    owners (7, 5)      nothing copied
"""

from __future__ import annotations

from typing import Optional

import torch

FREE = -2  # a block no slot owns (-1 is the base model's slot)


class Stack:
    """The kept blocks of one `SlotBank` (see the module docstring)."""

    def __init__(self) -> None:
        self.a: Optional[torch.Tensor] = None  # [blocks * r, in]
        self.b: Optional[torch.Tensor] = None  # [blocks * r, out]
        self.owners: list = []  # slot of each block, or FREE
        self.rank = 0

    def forget(self, slot: int) -> None:
        """`slot` is written again: its block, if it has one, is stale."""
        if slot in self.owners:
            i = self.owners.index(slot)
            self.owners[i] = FREE
            self.a[i * self.rank:(i + 1) * self.rank].zero_()
            self.b[i * self.rank:(i + 1) * self.rank].zero_()

    def missing(self, slots: tuple, rank: int) -> int:
        """How many of `slots` the next `gather` would copy."""
        if rank != self.rank:
            return len(slots)
        owned = set(self.owners)
        return sum(s not in owned for s in slots)

    def gather(self, bank, slots: tuple) -> tuple:
        """(A, Bᵀ, owners) holding the pairs of `slots` (all of one rank) in blocks, in no particular
        order; the blocks of other slots are free or belong to adapters not in this batch."""
        rank = bank.host_ranks[slots[0]]
        wanted, owned = set(slots), set(self.owners)
        lacking = [s for s in slots if s not in owned] if rank == self.rank else list(slots)
        spare = [i for i, owner in enumerate(self.owners) if owner not in wanted]
        if rank != self.rank or len(lacking) > len(spare) or 2 * len(self.owners) > 3 * len(slots):
            self.rank, self.owners = rank, list(slots)  # rebuilt for this batch alone
            self.a = torch.cat([bank.a[s] for s in slots])
            self.b = torch.cat([bank.b[s] for s in slots])
            return self.a, self.b, tuple(self.owners)
        for slot, i in zip(lacking, spare):
            rows = slice(i * rank, (i + 1) * rank)
            self.a[rows].copy_(bank.a[slot])
            self.b[rows].copy_(bank.b[slot])
            self.owners[i] = slot
        return self.a, self.b, tuple(self.owners)
