"""Which adapter lives in which slot. Pure Python: writing weights is the caller's job.

Allocation order for an adapter that is not resident: a free slot (lowest index first) → the least
recently used slot whose adapter the batch being placed does not need → `CapacityError`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

from ..errors import CapacityError


class _Empty:
    def __repr__(self) -> str:
        return "EMPTY"


EMPTY = _Empty()  # a free slot; distinct from None, which means "the base model"


class SlotTable:
    """`num_slots` slots, each EMPTY or holding one adapter name, evicted least recently used first."""

    def __init__(self, num_slots: int) -> None:
        self._contents: list = [EMPTY] * num_slots
        self._lru: OrderedDict = OrderedDict()  # name → slot, least recently used first

    @property
    def num_slots(self) -> int:
        return len(self._contents)

    def contents(self) -> tuple:
        """Slot i → adapter name or EMPTY."""
        return tuple(self._contents)

    def slot_of(self, name: str) -> Optional[int]:
        return self._lru.get(name)

    def acquire(self, names: Iterable[str]) -> tuple:
        """Give every adapter in `names` a slot, all at once.

        Returns ({name: slot}, [(slot, name), ...] for the names newly placed, whose weights the
        caller must write). Raises `CapacityError`, changing nothing, when they cannot all fit.
        """
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.num_slots:
            raise CapacityError(
                f"a batch needs {len(wanted)} distinct adapters at once, but there are only {self.num_slots} "
                f"slots (max_loras={self.num_slots}); split the batch or wrap with max_loras >= {len(wanted)}"
            )
        needed = set(wanted)
        free = [i for i, c in enumerate(self._contents) if c is EMPTY]
        victims = [n for n in self._lru if n not in needed]  # least recently used first
        placed = []
        for name in wanted:
            if name in self._lru:
                continue
            if free:
                slot = free.pop(0)
            else:
                slot = self._lru.pop(victims.pop(0))
            self._contents[slot] = name
            self._lru[name] = slot
            placed.append((slot, name))
        for name in wanted:
            self._lru.move_to_end(name)
        return {name: self._lru[name] for name in wanted}, placed

    def release(self, name: str) -> Optional[int]:
        """Free the slot of `name`, if it has one; returns that slot."""
        slot = self._lru.pop(name, None)
        if slot is not None:
            self._contents[slot] = EMPTY
        return slot
