"""Which content lives in which GPU slot, and what each slot's buffers were last written with.
Pure Python: the caller provides the weights and the function that writes them.

A slot holds one key: the cache uses content ids, so that two versions of one adapter name (one
still held by a running batch, one just published) are two keys in two slots. Allocation order for
a key that is not resident: a free slot (lowest index first) → the least recently used slot whose key
is neither needed by the same placement nor protected (pinned or in use by a running batch) →
`CapacityError`.

Every slot also records what its buffers hold: (label, key), EMPTY, or (label, None) once its key
left (freed, evicted: the buffers still hold *some* content of that label, an unknown one). `sync`
writes every slot whose record differs from its key, so a slot is always rewritten before it serves
a key it was not last written with.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Iterable, Optional

from ..errors import CapacityError


class _Empty:
    def __repr__(self) -> str:
        return "EMPTY"


EMPTY = _Empty()  # a free slot; distinct from None, which means "the base model"


def _never(key: Hashable) -> bool:
    return False


class SlotTable:
    """`num_slots` slots, each EMPTY or holding one key, evicted least recently used first.

    `label(key)` names a key in error messages (the cache passes the adapter name of a content id).
    """

    def __init__(self, num_slots: int, label: Callable[[Hashable], str] = str) -> None:
        self._contents: list = [EMPTY] * num_slots
        self._lru: OrderedDict = OrderedDict()  # key → slot, least recently used first
        self._label = label
        self._written: list = [EMPTY] * num_slots  # what each slot's buffers hold: (label, key) or EMPTY
        self._dirty: dict = {}  # slots whose buffers may lag the table (an ordered set)

    @property
    def lagging(self) -> bool:
        """Whether some slot may need writing (cheap: no lock needed to ask)."""
        return bool(self._dirty)

    @property
    def num_slots(self) -> int:
        return len(self._contents)

    def __len__(self) -> int:
        """Slots in use."""
        return len(self._lru)

    def __contains__(self, key: object) -> bool:
        return key in self._lru

    def contents(self) -> tuple:
        """Slot i → key or EMPTY."""
        return tuple(self._contents)

    def slot_of(self, key: Hashable) -> Optional[int]:
        return self._lru.get(key)

    def acquire(self, keys: Iterable[Hashable], protected: Callable[[Hashable], bool] = _never) -> tuple:
        """Give every key in `keys` a slot, all at once, and mark them most recently used.

        Keys for which `protected(key)` is true are never evicted. Returns ({key: slot},
        [(slot, key, evicted key or EMPTY), ...] for the keys newly placed, whose weights the
        caller must write). Raises `CapacityError`, changing nothing, when they cannot all fit.
        """
        wanted = list(dict.fromkeys(keys))
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
            held = sorted({self._label(n) for n in self._lru if n not in needed and protected(n)})
            raise CapacityError(
                f"{len(new)} more adapters need a slot, but only {len(free) + len(victims)} of the "
                f"{self.num_slots} slots (max_loras={self.num_slots}) can take one: {held} are pinned "
                "or in use by the running batch; wait for them to be released, unpin some, or raise max_loras"
            )
        placed = []
        for key in new:
            if free:
                slot, evicted = free.pop(0), EMPTY
            else:
                evicted = victims.pop(0)
                slot = self._lru.pop(evicted)
            self._contents[slot] = key
            self._lru[key] = slot
            self._dirty[slot] = None
            placed.append((slot, key, evicted))
        for key in wanted:
            self._lru.move_to_end(key)
        return {key: self._lru[key] for key in wanted}, placed

    def swap(self, old: Hashable, new: Hashable) -> int:
        """Put `new` in the slot of `old` (which must be resident), keeping its place in the LRU order."""
        slot = self._lru[old]
        self._lru = OrderedDict((new if k == old else k, s) for k, s in self._lru.items())
        self._contents[slot] = new
        self._dirty[slot] = None
        return slot

    def release(self, key: Hashable) -> Optional[int]:
        """Free the slot of `key`, if it has one (its buffers now hold an unknown content); returns
        that slot. It is emptied at the next `sync` unless another key takes it first."""
        slot = self._lru.pop(key, None)
        if slot is not None:
            self._contents[slot] = EMPTY
            written = self._written[slot]
            if written is not EMPTY:
                self._written[slot] = (written[0], None)
            self._dirty[slot] = None
        return slot

    def sync(self, weights: Callable[[Hashable], object], write: Callable[[list], None]) -> int:
        """Write every slot whose buffers lag its key: `write([(slot, weights(key) or None), ...])`.
        Returns how many writes changed the label a slot holds (slot swaps). If `write` raises,
        nothing is recorded and the same slots are written next time."""
        writes, written = [], {}
        for slot in self._dirty:
            key = self._contents[slot]
            held = EMPTY if key is EMPTY else (self._label(key), key)
            if held != self._written[slot]:
                writes.append((slot, None if key is EMPTY else weights(key)))
                written[slot] = held
        if writes:
            write(writes)
        swaps = 0
        for slot, held in written.items():
            before = self._written[slot]
            swaps += held is not EMPTY and (before is EMPTY or before[0] != held[0])
            self._written[slot] = held
        self._dirty.clear()
        return swaps
