"""Slot memory: where the weights of the adapters in slots live, each at its own size (nothing padded).

The slot tier has a budget in bytes (`wrap(lora_memory=...)`). Each adapter in a slot takes one block
of a `Pool`, a 1-D tensor per (device, dtype) allocated once at the budget's size, and its block
holds every piece its targets need, as each target's `slot_pieces` says: A [r, in] and Bᵀ [r, out] at
the adapter's own rank, DoRA gains, LoRA biases, per-expert pairs, trainable-token rows, module
copies. What an adapter costs (`size`) is exactly the block it takes, so the adapter cache, which
decides residency by these sizes, never admits what the pools cannot hold. Pieces that are not
floating point (trainable-token ids) are small tensors of their own, counted in the same budget.

Blocks are placed first fit. When a block does not fit in any gap although enough bytes are free,
the pool is compacted: blocks slide down in address order (device copies, no re-read), and every
target whose views moved is re-pointed (`bind`). Writes happen only between forwards
(`AdapterCache.sync`), on the model's copy stream on CUDA, so no forward sees a block move.

Running example: a budget of 96 elements; blocks X (32 elements), Y (48), Z (16), W (32):
    place X, Y           blocks X [0, 32), Y [32, 80)                free [80, 96)
    free X, place Z      Z [0, 16), Y [32, 80)                       free [16, 32) and [80, 96)
    place W (32)         no gap of 32 → compact: Z [0, 16), Y [16, 64), W [64, 96)
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch


logger = logging.getLogger(__name__)

ALIGN = 8  # elements: every piece starts at a multiple (16 bytes in half precision: vector loads)
CPU_DEFAULT_BYTES = 1 << 30  # the budget on a CPU model when none is given (pages are touched only when used)
CUDA_DEFAULT_FRACTION = 0.1  # of the device's free memory at wrap time, when no budget is given

PoolKey = Tuple[torch.device, torch.dtype]


def default_budget(device: torch.device) -> int:
    """The slot tier's budget when `lora_memory` is not given: a fraction of the free memory of a
    CUDA device (after the model is on it), a fixed size on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_DEFAULT_FRACTION)
    return CPU_DEFAULT_BYTES


def _aligned(numel: int) -> int:
    return -(-numel // ALIGN) * ALIGN


class Pool:
    """A 1-D tensor of `capacity` elements, handed out in blocks (one per slot), first fit."""

    def __init__(self, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.capacity, self.device, self.dtype = capacity, device, dtype
        self._storage: Optional[torch.Tensor] = None
        self.blocks: Dict[int, Tuple[int, int]] = {}  # slot → (start, length)

    @property
    def storage(self) -> torch.Tensor:
        if self._storage is None:  # allocated when first used
            self._storage = torch.empty(self.capacity, device=self.device, dtype=self.dtype)
        return self._storage

    @property
    def used(self) -> int:
        return sum(length for _, length in self.blocks.values())

    def gaps(self) -> list:
        """[(start, length)] of the free runs, in address order."""
        gaps, end = [], 0
        for start, length in sorted(self.blocks.values()):
            if start > end:
                gaps.append((end, start - end))
            end = start + length
        if end < self.capacity:
            gaps.append((end, self.capacity - end))
        return gaps

    def alloc(self, slot: int, length: int) -> Optional[int]:
        """The start of a block of `length` elements for `slot` (first fit), or None if no gap holds it."""
        for start, size in self.gaps():
            if size >= length:
                self.blocks[slot] = (start, length)
                return start
        return None

    def free(self, slot: int) -> None:
        self.blocks.pop(slot, None)

    def compact(self) -> list:
        """Slide every block down to close the gaps; returns the slots whose block moved."""
        moved, end = [], 0
        for slot, (start, length) in sorted(self.blocks.items(), key=lambda item: item[1][0]):
            if start != end:
                data = self.storage[start:start + length]
                # a block that overlaps its new place is copied through a temporary
                self.storage[end:end + length].copy_(data.clone() if start < end + length else data)
                self.blocks[slot] = (end, length)
                moved.append(slot)
            end += length
        return moved

    def fragmentation(self) -> float:
        """1 - the largest free run / all free elements: 0 when the free memory is one run."""
        gaps = [length for _, length in self.gaps()]
        free = sum(gaps)
        return 0.0 if free == 0 else 1 - max(gaps) / free


class SlotMemory:
    """The pools behind every target's slot views, and what each slot's adapter holds where.

    `targets`: {target name: module with `slot_pieces`, `write_slot`, `bind`}, as the model wraps them.
    """

    def __init__(self, budget: int, targets: Mapping[str, torch.nn.Module]) -> None:
        self.budget = budget
        self.targets = dict(targets)
        self._pools: Dict[PoolKey, Pool] = {}
        self._layouts: Dict[int, dict] = {}  # slot → {pool key: [(target, piece, shape, offset in block)]}
        self.compactions = 0

    # sizes ------------------------------------------------------------------------------------------
    def _pieces(self, weights) -> Dict[str, dict]:
        """{target: {piece: (shape, dtype, device)}} of an adapter's weights (AdapterWeights)."""
        return {name: self.targets[name].slot_pieces(w) for name, w in weights.modules.items()
                if name in self.targets}

    @staticmethod
    def _layout(pieces: Dict[str, dict]) -> tuple:
        """({pool key: [(target, piece, shape, offset in the block)]}, {pool key: block length},
        [(target, piece, shape, dtype, device)] of the pieces kept outside the pools: ids)."""
        layout: Dict[PoolKey, list] = {}
        lengths: Dict[PoolKey, int] = {}
        outside = []
        for name, own in pieces.items():
            for piece, (shape, dtype, device) in own.items():
                if not dtype.is_floating_point:
                    outside.append((name, piece, tuple(shape), dtype, device))
                    continue
                key = (torch.device(device), dtype)
                offset = lengths.get(key, 0)
                layout.setdefault(key, []).append((name, piece, tuple(shape), offset))
                lengths[key] = offset + _aligned(math.prod(shape))
        return layout, lengths, outside

    def size(self, weights) -> int:
        """The bytes an adapter takes in slot memory: its blocks (pieces aligned to ALIGN elements)
        and its pieces outside the pools."""
        _, lengths, outside = self._layout(self._pieces(weights))
        return (sum(length * key[1].itemsize for key, length in lengths.items())
                + sum(math.prod(shape) * dtype.itemsize for _, _, shape, dtype, _ in outside))

    # writes -----------------------------------------------------------------------------------------
    def write(self, writes: Sequence[tuple], non_blocking: bool = False) -> None:
        """[(slot, AdapterWeights or None)]: free every slot written, then place the new contents."""
        for slot, _ in writes:
            for pool in self._pools.values():
                pool.free(slot)
            self._layouts.pop(slot, None)
        for slot, weights in writes:
            views = {} if weights is None else self._place(slot, self._pieces(weights))
            for name, target in self.targets.items():
                w = None if weights is None else weights.modules.get(name)
                target.write_slot(slot, w, views.get(name, {}) if w is not None else {}, non_blocking=non_blocking)
        self._flush()

    def _flush(self) -> None:
        """The kernels' tables on a GPU are written now, with the slots (a captured CUDA graph reads them
        where they are); on a CPU the torch path never reads them, so they wait until something does."""
        for target in self.targets.values():
            bank = getattr(target, "bank", None)
            if bank is not None and bank.device.type == "cuda":
                bank.flush()

    def _place(self, slot: int, pieces: Dict[str, dict]) -> Dict[str, dict]:
        layout, lengths, outside = self._layout(pieces)
        views: Dict[str, dict] = {name: {} for name in pieces}
        for name, piece, shape, dtype, device in outside:  # ids: a small tensor of their own
            views[name][piece] = torch.empty(shape, dtype=dtype, device=device)
        for key, length in lengths.items():
            pool = self._pool(key)
            if pool.alloc(slot, length) is None:
                self._compact(pool)
                if pool.alloc(slot, length) is None:
                    raise RuntimeError(f"slot memory: a block of {length} elements does not fit in a pool of "
                                       f"{pool.capacity} with {pool.capacity - pool.used} free (the cache "
                                       "admitted more than the budget)")
        self._layouts[slot] = layout
        for name, own in self._views(slot).items():
            views[name].update(own)
        return views

    def _views(self, slot: int) -> Dict[str, dict]:
        """{target: {piece: view}} of a slot's pooled pieces, where its blocks are now."""
        views: Dict[str, dict] = {}
        for key, entries in self._layouts.get(slot, {}).items():
            pool = self._pools[key]
            start = pool.blocks[slot][0]
            for name, piece, shape, offset in entries:
                begin = start + offset
                views.setdefault(name, {})[piece] = pool.storage[begin:begin + math.prod(shape)].view(shape)
        return views

    def _compact(self, pool: Pool) -> None:
        moved = pool.compact()
        self.compactions += 1
        logger.debug("slot memory compacted (%d blocks moved)", len(moved))
        for slot in moved:
            for name, views in self._views(slot).items():
                self.targets[name].bind(slot, views)

    def _pool(self, key: PoolKey) -> Pool:
        pool = self._pools.get(key)
        if pool is None:
            device, dtype = key
            pool = self._pools[key] = Pool(self.budget // dtype.itemsize // ALIGN * ALIGN, device, dtype)
        return pool

    # stats ------------------------------------------------------------------------------------------
    def reserved(self) -> int:
        """Bytes the pools hold on their devices (allocated at the budget's size when first used)."""
        return sum(p.capacity * p.dtype.itemsize for p in self._pools.values() if p._storage is not None)

    def fragmentation(self) -> float:
        """The worst pool's `Pool.fragmentation` (0 when no pool is used)."""
        return max((p.fragmentation() for p in self._pools.values()), default=0.0)
