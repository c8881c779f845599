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
    """Memory per tier and counters since the model was wrapped. Bytes are adapter weights (A and
    scaled B at their real ranks, and whatever else a kind holds); `slot_buffer_bytes` is what the
    slot buffers reserve: up front, but for an embedding's LoRA buffers, allocated when the first
    adapter needs them."""

    registered: int
    pinned: int
    in_use: int  # contents held by a running batch
    num_slots: int
    slots_used: int
    gpu_bytes: int
    slot_buffer_bytes: int
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


def not_registered(name: str, known) -> str:
    """The message for an adapter name that is not among `known`: a few of them, sorted."""
    known = sorted(known)
    shown = ", ".join(repr(n) for n in known[:8]) + (", ..." if len(known) > 8 else "")
    return f"adapter {name!r} is not registered ({len(known)} registered: {shown or 'none'})"
