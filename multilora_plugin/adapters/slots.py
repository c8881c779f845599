"""Which adapter lives in which GPU slot. Pure Python: writing the weights is the caller's job.

Allocation order for an adapter that is not resident: a free slot (lowest index first) → the least
recently used slot whose adapter is neither needed by the same placement nor protected (pinned or in
use by the running batch) → `CapacityError`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable, Optional

from ..errors import CapacityError


class _Empty:
    def __repr__(self) -> str:
        return "EMPTY"


EMPTY = _Empty()  # a free slot; distinct from None, which means "the base model"


def _never(name: str) -> bool:
    return False


class SlotTable:
    """`num_slots` slots, each EMPTY or holding one adapter name, evicted least recently used first."""

    def __init__(self, num_slots: int) -> None:
        self._contents: list = [EMPTY] * num_slots
        self._lru: OrderedDict = OrderedDict()  # name → slot, least recently used first

    @property
    def num_slots(self) -> int:
        return len(self._contents)

    def __len__(self) -> int:
        """Slots in use."""
        return len(self._lru)

    def __contains__(self, name: object) -> bool:
        return name in self._lru

    def contents(self) -> tuple:
        """Slot i → adapter name or EMPTY."""
        return tuple(self._contents)

    def slot_of(self, name: str) -> Optional[int]:
        return self._lru.get(name)

    def acquire(self, names: Iterable[str], protected: Callable[[str], bool] = _never) -> tuple:
        """Give every adapter in `names` a slot, all at once, and mark them most recently used.

        Adapters for which `protected(name)` is true are never evicted. Returns ({name: slot},
        [(slot, name, evicted name or EMPTY), ...] for the names newly placed, whose weights the
        caller must write). Raises `CapacityError`, changing nothing, when they cannot all fit.
        """
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.num_slots:
            raise CapacityError(
                f"a batch needs {len(wanted)} distinct adapters at once, but there are only {self.num_slots} "
                f"slots (max_loras={self.num_slots}); split the batch or wrap with max_loras >= {len(wanted)}"
            )
        needed = set(wanted)
        new = [n for n in wanted if n not in self._lru]
        free = [i for i, c in enumerate(self._contents) if c is EMPTY]
        victims = [n for n in self._lru if n not in needed and not protected(n)]  # least recently used first
        if len(new) > len(free) + len(victims):
            held = [n for n in self._lru if n not in needed and protected(n)]
            raise CapacityError(
                f"{len(new)} more adapters need a slot, but only {len(free) + len(victims)} of the "
                f"{self.num_slots} slots (max_loras={self.num_slots}) can take one: {sorted(held)} are pinned "
                "or in use by the running batch; wait for them to be released, unpin some, or raise max_loras"
            )
        placed = []
        for name in new:
            if free:
                slot, evicted = free.pop(0), EMPTY
            else:
                evicted = victims.pop(0)
                slot = self._lru.pop(evicted)
            self._contents[slot] = name
            self._lru[name] = slot
            placed.append((slot, name, evicted))
        for name in wanted:
            self._lru.move_to_end(name)
        return {name: self._lru[name] for name in wanted}, placed

    def release(self, name: str) -> Optional[int]:
        """Free the slot of `name`, if it has one; returns that slot."""
        slot = self._lru.pop(name, None)
        if slot is not None:
            self._contents[slot] = EMPTY
        return slot
