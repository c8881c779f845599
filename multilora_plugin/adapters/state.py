"""What the adapter cache tells the rest of the system: states, events, holds and stats."""

from __future__ import annotations

import enum
import logging
import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Mapping, Optional

logger = logging.getLogger(__name__)


class AdapterState(str, enum.Enum):
    COLD = "cold"  # registered; weights on disk only
    LOADING = "loading"  # being read from disk
    CPU = "cpu"  # weights in the CPU tier
    ACTIVE = "active"  # in a slot (and in the CPU tier)
    EVICTING = "evicting"  # unloaded, but a running batch still holds its last content


@dataclass(frozen=True)
class AdapterEvent:
    name: str
    old: Optional[AdapterState]  # None: just registered
    new: Optional[AdapterState]  # None: gone (unloaded)
    slot: Optional[int] = None  # the slot entered (new ACTIVE) or left (old ACTIVE)


class EventQueue:
    """State changes queued under the cache's lock and sent to the listeners outside it, in order."""

    def __init__(self, lock) -> None:
        self.listeners: list = []  # called with each AdapterEvent
        self._lock = lock  # the cache's
        self._events: deque = deque()
        self._dispatch_lock = threading.RLock()

    def emit(self, name: str, old: Optional[AdapterState], new: Optional[AdapterState],
             slot: Optional[int] = None) -> None:
        """Queue an event (the caller holds the lock); no event when nothing changed."""
        if old != new:
            self._events.append(AdapterEvent(name, old, new, slot))

    def dispatch(self) -> None:
        """Send the queued events (the caller does not hold the lock). A listener that raises is
        logged and never breaks the cache."""
        with self._dispatch_lock:
            while True:
                with self._lock:
                    if not self._events:
                        return
                    event = self._events.popleft()
                _log(event)
                for listener in list(self.listeners):
                    try:
                        listener(event)
                    except Exception:
                        logger.exception("adapter event listener %r failed on %s", listener, event)


_MEMORY = (AdapterState.CPU, AdapterState.ACTIVE, AdapterState.EVICTING)


def _log(event: AdapterEvent) -> None:
    """Loads, evictions and unloads at INFO (an operator's record); slot moves at DEBUG."""
    if event.new is None:
        logger.info("adapter %r unloaded", event.name)
    elif event.new is AdapterState.CPU and event.old not in _MEMORY:
        logger.info("adapter %r loaded into CPU memory", event.name)
    elif event.new is AdapterState.COLD and event.old in _MEMORY:
        logger.info("adapter %r evicted from memory (read again from disk when next used)", event.name)
    elif AdapterState.ACTIVE in (event.old, event.new):
        logger.debug("adapter %r %s slot %s", event.name, "into" if event.new is AdapterState.ACTIVE else "out of",
                     event.slot)


class Hold:
    """What one `AdapterCache.acquire` holds: the content each adapter had at that moment, in its
    slot, unchanged until `AdapterCache.release(hold)`, whatever happens to the name meanwhile."""

    def __init__(self, slots: Mapping[str, int], content_ids: Mapping[str, int], contents: list) -> None:
        self.slots = dict(slots)  # adapter name → slot
        self.content_ids = dict(content_ids)  # adapter name → the content id held
        self.contents = contents  # the cache's records of those contents (for `release`)
        self.released = False

    def __repr__(self) -> str:
        return f"Hold(slots={self.slots}, content_ids={self.content_ids}, released={self.released})"


@dataclass(frozen=True)
class CacheStats:
    """Memory per tier and counters since the model was wrapped. CPU bytes are adapter weights (A and
    scaled B at their real ranks, and whatever else a kind holds); slot bytes are what the adapters in
    slots take in slot memory (the same, at their own ranks, aligned). `slot_memory_bytes` is the
    budget (`lora_memory`), `slot_free_bytes` what is left of it, `slot_buffer_bytes` what the slot
    memory's pools hold on the device (each allocated at the budget's size when first used), and
    `slot_fragmentation` 1 - the largest free run / the free memory of the worst pool."""

    registered: int
    pinned: int
    in_use: int  # contents held by a running batch
    num_slots: int
    slots_used: int
    gpu_bytes: int  # slot memory the adapters in slots take
    slot_memory_bytes: Optional[int]
    slot_free_bytes: Optional[int]
    slot_buffer_bytes: int
    slot_fragmentation: float
    max_cpu_loras: int
    cpu_entries: int  # contents in CPU memory (older versions still held by a batch included)
    cpu_bytes: int
    gpu_hits: int  # adapter lookups by a batch (or a pin) that found it in a slot
    gpu_misses: int
    cpu_hits: int  # of the GPU misses: found in the CPU tier
    cpu_misses: int  # of the GPU misses: read from disk
    loads: int  # successful disk reads (prefetches included)
    load_errors: int
    gpu_evictions: int  # adapters pushed out of a slot (to make room, or by `evict`)
    cpu_evictions: int  # adapters dropped from the CPU tier (to make room, or by `evict`)
    slot_swaps: int  # slot writes that changed the adapter a slot holds

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, entries: list, live: list, in_slots: list, slots, max_cpu_loras: int, memory: Mapping,
           counters: "Counters") -> "CacheStats":
        """From the cache's tables (its lock held): registry entries, contents in memory, contents in
        slots, the slot table, the slot memory's {"reserved", "fragmentation"}."""
        capacity = slots.capacity
        return cls(
            registered=len(entries),
            pinned=sum(e.pinned for e in entries),
            in_use=sum(c.refs > 0 for c in live),
            num_slots=slots.num_slots,
            slots_used=len(in_slots),
            gpu_bytes=sum(c.size for c in in_slots),
            slot_memory_bytes=capacity,
            slot_free_bytes=None if capacity is None else capacity - slots.used_bytes,
            slot_buffer_bytes=memory.get("reserved", 0),
            slot_fragmentation=memory.get("fragmentation", 0.0),
            max_cpu_loras=max_cpu_loras,
            cpu_entries=len(live),
            cpu_bytes=sum(c.weights.num_bytes for c in live),
            **asdict(counters),
        )


@dataclass
class Counters:
    gpu_hits: int = 0
    gpu_misses: int = 0
    cpu_hits: int = 0
    cpu_misses: int = 0
    loads: int = 0
    load_errors: int = 0
    gpu_evictions: int = 0
    cpu_evictions: int = 0
    slot_swaps: int = 0

    def count_lookups(self, entries: list, slots) -> None:
        """One look-up per entry: in a slot (gpu hit), in CPU memory (cpu hit) or on disk."""
        for entry in entries:
            resident = entry.content is not None and entry.content.id in slots
            self.gpu_hits += resident
            self.gpu_misses += not resident
            self.cpu_hits += not resident and entry.content is not None
            self.cpu_misses += entry.content is None


def not_registered(name: str, known) -> str:
    """The message for an adapter name that is not among `known`: a few of them, sorted."""
    known = sorted(known)
    shown = ", ".join(repr(n) for n in known[:8]) + (", ..." if len(known) > 8 else "")
    return f"adapter {name!r} is not registered ({len(known)} registered: {shown or 'none'})"
