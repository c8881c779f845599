"""Which content lives in which GPU slot, and what each slot's buffers were last written with.
Pure Python: the caller provides the weights and the function that writes them.

A slot holds one key: the cache uses content ids, so that two versions of one adapter name (one
still held by a running batch, one just published) are two keys in two slots. The table is bounded
twice: `num_slots` keys, and `capacity` bytes of slot memory, each key taking `size(key)` (its own
size, nothing padded). Placing keys that are not resident evicts, least recently used first, keys
that are neither needed by the same placement nor protected (pinned or in use by a running batch),
only as many as needed for both bounds; new keys take the free slots, lowest index first. When the
unprotected keys do not make room: `CapacityError`, and nothing changes.

Every slot also records what its buffers hold: (label, key), EMPTY, or (label, None) once its key
left (freed, evicted: the buffers still hold *some* content of that label, an unknown one). `sync`
writes every slot whose record differs from its key, so a slot is always rewritten before it serves
a key it was not last written with.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Collection, Hashable, Iterable, Optional

from ..errors import AdapterTooLargeError, CapacityError


class _Empty:
    def __repr__(self) -> str:
        return "EMPTY"


EMPTY = _Empty()  # a free slot; distinct from None, which means "the base model"


def _never(key: Hashable) -> bool:
    return False


def _no_size(key: Hashable) -> int:
    return 0


def human_bytes(num_bytes: float) -> str:
    """'512 B', '3.0 KiB', '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB"):
        if abs(num_bytes) < 1024:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"


class SlotTable:
    """`num_slots` slots, each EMPTY or holding one key, evicted least recently used first.

    `label(key)` names a key in error messages (the cache passes the adapter name of a content id).
    """

    def __init__(self, num_slots: int, label: Callable[[Hashable], str] = str, capacity: Optional[int] = None,
                 size: Callable[[Hashable], int] = _no_size) -> None:
        self.capacity = capacity  # bytes; None: bounded by the slot count only
        self._size = size
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

    @property
    def used_bytes(self) -> int:
        """Bytes the resident keys take."""
        return sum(self._size(k) for k in self._lru)

    def contents(self) -> tuple:
        """Slot i → key or EMPTY."""
        return tuple(self._contents)

    def resident(self) -> list:
        """The keys in slots, least recently used first."""
        return list(self._lru)

    def slot_of(self, key: Hashable) -> Optional[int]:
        return self._lru.get(key)

    def acquire(self, keys: Iterable[Hashable], protected: Callable[[Hashable], bool] = _never) -> tuple:
        """Give every key in `keys` a slot, all at once, and mark them most recently used.

        Keys for which `protected(key)` is true are never evicted. Returns ({key: slot},
        [(slot, key), ...] for the keys newly placed, whose weights the caller must write, and
        [(slot, key), ...] for the keys evicted). Raises `CapacityError` (`AdapterTooLargeError` for a
        key larger than the whole capacity), changing nothing, when they cannot all fit.
        """
        wanted = list(dict.fromkeys(keys))
        self._check_alone(wanted)
        needed = set(wanted)
        new = [n for n in wanted if n not in self._lru]
        free = [i for i, c in enumerate(self._contents) if c is EMPTY]
        victims = [n for n in self._lru if n not in needed and not protected(n)]  # least recently used first
        evicted = self._victims(new, len(free), victims)
        if evicted is None:
            raise CapacityError(self._no_room(wanted, new, protected))
        out = []
        for key in evicted:
            slot = self._lru.pop(key)
            self._contents[slot] = EMPTY
            self._forget(slot)
            out.append((slot, key))
            free.append(slot)
        free.sort()
        placed = []
        for key in new:
            slot = free.pop(0)
            self._contents[slot] = key
            self._lru[key] = slot
            self._dirty[slot] = None
            placed.append((slot, key))
        for key in wanted:
            self._lru.move_to_end(key)
        return {key: self._lru[key] for key in wanted}, placed, out

    def fits(self, keys: Collection[Hashable], kept: Iterable[Hashable], sizes: Iterable[int] = ()) -> bool:
        """Whether `keys` (resident or not) and `sizes` (of keys not yet known) fit beside the keys
        that stay whatever is placed (`kept`: protected keys not among them)."""
        kept = [k for k in kept if k not in keys]
        sizes = list(sizes)
        if len(kept) + len(keys) + len(sizes) > self.num_slots:
            return False
        if self.capacity is None:
            return True
        return sum(map(self._size, kept)) + sum(map(self._size, keys)) + sum(sizes) <= self.capacity

    def _check_alone(self, wanted: list) -> None:
        if len(wanted) > self.num_slots:
            raise CapacityError(
                f"a batch needs {len(wanted)} distinct adapters at once, but there are only {self.num_slots} "
                f"slots (max_loras={self.num_slots}); split the batch or wrap with max_loras >= {len(wanted)}"
            )
        if self.capacity is None:
            return
        for key in wanted:
            self.check_size(self._label(key), self._size(key))
        total = sum(map(self._size, wanted))
        if total > self.capacity:
            raise CapacityError(
                f"a batch needs {len(wanted)} adapters of {human_bytes(total)} together in slot memory, but the budget "
                f"is {human_bytes(self.capacity)} (lora_memory); split the batch or wrap with a larger lora_memory"
            )

    def check_size(self, label: str, size: int) -> None:
        """`AdapterTooLargeError` when one adapter of `size` bytes exceeds the whole capacity."""
        if self.capacity is not None and size > self.capacity:
            raise AdapterTooLargeError(
                f"adapter {label!r} needs {human_bytes(size)} of slot memory, more than the whole budget of "
                f"{human_bytes(self.capacity)} (lora_memory); wrap with a larger lora_memory")

    def _victims(self, new: list, free: int, victims: list) -> Optional[list]:
        """The fewest least recently used `victims` to evict so that `new` keys fit, or None."""
        need_slots = len(new) - free
        used = self.used_bytes + sum(map(self._size, new))
        chosen = []
        for key in victims:
            if need_slots <= 0 and (self.capacity is None or used <= self.capacity):
                break
            chosen.append(key)
            need_slots -= 1
            used -= self._size(key)
        if need_slots > 0 or (self.capacity is not None and used > self.capacity):
            return None
        return chosen

    def _no_room(self, wanted: list, new: list, protected: Callable[[Hashable], bool]) -> str:
        held = [n for n in self._lru if n not in set(wanted) and protected(n)]
        labels = sorted({self._label(n) for n in held})
        budget = "" if self.capacity is None else (
            f" and {human_bytes(sum(map(self._size, held)))} of the {human_bytes(self.capacity)} of slot memory (lora_memory)")
        return (f"{len(new)} more adapters need slot memory, but {len(held)} of the {self.num_slots} slots"
                f"{budget} are taken by {labels}, pinned or in use by the running batch; wait for them to be "
                "released, unpin some, or raise max_loras / lora_memory")

    def _forget(self, slot: int) -> None:
        """The key of `slot` left: its buffers hold an unknown content of that label until written."""
        written = self._written[slot]
        if written is not EMPTY:
            self._written[slot] = (written[0], None)
        self._dirty[slot] = None

    def swap(self, old: Hashable, new: Hashable, growth: int = 0) -> Optional[int]:
        """Put `new` in the slot of `old` (which must be resident), keeping its place in the LRU order;
        `growth`: how many more bytes `new` takes. None (nothing changes) when it does not fit."""
        if self.capacity is not None and growth > 0 and self.used_bytes + growth > self.capacity:
            return None
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
            self._forget(slot)
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
