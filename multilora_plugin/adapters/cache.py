"""The adapter cache: disk → CPU LRU (`max_cpu_loras`) → GPU slots (`max_loras`).

Tiers are inclusive: an adapter in a slot keeps its CPU copy, so a slot can always be rewritten
(after a hot replace) and the CPU tier never drops what a slot holds. Per adapter the state is

    COLD ──► LOADING ──► CPU ◄──► ACTIVE          EVICTING: unloaded while a running batch still
      ▲                   │                       uses it; freed when the last user releases it
      └───────────────────┘  (CPU LRU eviction)

and every change is an `AdapterEvent` sent to the listeners.

Threads: every method may be called from any thread; one lock guards the tables. Disk reads run
outside the lock, on the thread that needs the adapter or on the prefetch pool, and one adapter is
read at most once at a time (later callers wait for the same future). The slot buffers are written
only by `sync()`, which the model calls at the start of each forward, so a placement, replacement or
unload made by another thread (or by a hook in the middle of a forward) takes effect at the next
forward and never during one.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Sequence

from ..errors import AdapterExistsError, AdapterLoadError, AdapterNotFoundError, CapacityError, MultiLoRAError
from .checkpoint import AdapterWeights
from .registry import AdapterSource
from .slots import EMPTY, SlotTable

logger = logging.getLogger(__name__)


class AdapterState(str, enum.Enum):
    COLD = "cold"  # registered; weights on disk only
    LOADING = "loading"  # being read from disk
    CPU = "cpu"  # weights in the CPU tier
    ACTIVE = "active"  # in a slot (and in the CPU tier)
    EVICTING = "evicting"  # unloaded, but still in use by a running batch


@dataclass(frozen=True)
class AdapterEvent:
    name: str
    old: Optional[AdapterState]  # None: just registered
    new: Optional[AdapterState]  # None: gone (unloaded)
    slot: Optional[int] = None  # the slot entered (new ACTIVE) or left (old ACTIVE)


@dataclass(frozen=True)
class CacheStats:
    """Memory per tier and counters since the model was wrapped. Bytes are adapter weights (A and
    scaled B at their real ranks); `slot_buffer_bytes` is what the slot buffers reserve up front."""

    registered: int
    pinned: int
    in_use: int  # adapters held by a running batch
    num_slots: int
    slots_used: int
    gpu_bytes: int
    slot_buffer_bytes: int
    max_cpu_loras: int
    cpu_entries: int
    cpu_bytes: int
    gpu_hits: int  # adapter lookups by a batch (or a pin) that found it in a slot
    gpu_misses: int
    cpu_hits: int  # of the GPU misses: found in the CPU tier
    cpu_misses: int  # of the GPU misses: read from disk
    loads: int  # successful disk reads (prefetches included)
    load_errors: int
    gpu_evictions: int  # adapters pushed out of a slot to make room
    cpu_evictions: int  # adapters dropped from the CPU tier to make room
    slot_swaps: int  # slot writes that changed the adapter a slot holds

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Counters:
    gpu_hits: int = 0
    gpu_misses: int = 0
    cpu_hits: int = 0
    cpu_misses: int = 0
    loads: int = 0
    load_errors: int = 0
    gpu_evictions: int = 0
    cpu_evictions: int = 0
    slot_swaps: int = 0


@dataclass(eq=False)
class _Entry:
    source: AdapterSource
    weights: Optional[AdapterWeights] = None  # set ⇔ in the CPU tier
    loading: Optional["_Load"] = None  # set ⇔ a disk read for `source` is running
    refs: int = 0  # running batches using it; > 0 ⇒ in a slot
    pinned: bool = False  # ⇒ in a slot
    unloaded: bool = False  # EVICTING: gone once refs reach 0


class _Load(Future):
    """A disk read of one adapter version; whoever claims it first (the prefetch pool or a thread
    that needs the adapter now) reads, everybody else waits on it."""

    claimed = False

    def cancel(self) -> bool:  # other callers may be waiting on the same read
        return False


Reader = Callable[[AdapterSource], AdapterWeights]
Writer = Callable[[Sequence[tuple]], None]  # [(slot, AdapterWeights or None), ...]


def not_registered(name: str, known) -> str:
    """The message for an adapter name that is not among `known`: a few of them, sorted."""
    known = sorted(known)
    shown = ", ".join(repr(n) for n in known[:8]) + (", ..." if len(known) > 8 else "")
    return f"adapter {name!r} is not registered ({len(known)} registered: {shown or 'none'})"


class AdapterCache:
    """Registered adapters and where their weights are. See the module docstring."""

    def __init__(self, *, num_slots: int, max_cpu_loras: int, read: Reader, write: Writer,
                 slot_buffer_bytes: int = 0, prefetch_workers: int = 2) -> None:
        if max_cpu_loras < num_slots:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) should be >= the number of slots ({num_slots})")
        self.max_cpu_loras = max_cpu_loras
        self.listeners: list = []  # called with each AdapterEvent, outside the lock
        self._read, self._write = read, write
        self._slot_buffer_bytes = slot_buffer_bytes
        self._prefetch_workers = prefetch_workers
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.RLock()
        self._entries: dict = {}  # name → _Entry, every registered adapter
        self._cpu: OrderedDict = OrderedDict()  # name → _Entry in the CPU tier, least recently used first
        self._slots = SlotTable(num_slots)
        self._written: list = [EMPTY] * num_slots  # what each slot buffer holds: (name, version) or EMPTY
        self._dirty: dict = {}  # slots whose buffers lag the table (an ordered set)
        self._counters = _Counters()
        self._events: deque = deque()
        self._dispatch_lock = threading.RLock()

    # registry ---------------------------------------------------------------------------------------
    def register(self, source: AdapterSource, weights: Optional[AdapterWeights] = None, replace: bool = False) -> None:
        """Add an adapter (COLD, or CPU when its `weights` are given). With `replace`, an adapter of
        that name gets the new source (its version one higher) and weights in place: a slot holding it
        is rewritten at the next `sync()`, so a batch using it sees the new weights from its next
        forward on."""
        if replace and weights is None:
            raise ValueError("replacing an adapter needs its new weights")
        with self._lock:
            entry = self._entries.get(source.name)
            if entry is not None and entry.unloaded:
                raise AdapterExistsError(
                    f"adapter {source.name!r} was unloaded but a running batch still uses it; "
                    "register it again once that batch has finished"
                )
            if entry is not None and not replace:
                raise AdapterExistsError(
                    f"an adapter named {source.name!r} is already registered (from {entry.source.path!r}); "
                    "unload it first, pick another name, or pass replace=True"
                )
            if entry is None:
                entry = self._entries[source.name] = _Entry(dataclasses.replace(source, version=1))
                self._emit(source.name, None, AdapterState.COLD)
            else:
                source = dataclasses.replace(source, version=entry.source.version + 1)
            old = self._state(entry)
            entry.source, entry.loading = source, None  # a read of the old version still running is dropped
            if weights is not None:
                self._admit(entry, weights)
                slot = self._slots.slot_of(source.name)
                if slot is not None:
                    self._dirty[slot] = None
                self._trim_cpu()
            self._note(entry, old)
        self._dispatch()

    def unregister(self, name: str) -> None:
        """Unload: free the slot and the CPU copy now, or, if a running batch uses the adapter, as
        soon as it releases it (EVICTING until then). New batches cannot use it either way."""
        with self._lock:
            entry = self._known(name)
            old = self._state(entry)
            entry.pinned, entry.unloaded, entry.loading = False, True, None
            if entry.refs == 0:
                self._free(entry, old)
            else:
                self._note(entry, old)
        self._dispatch()

    def evict(self, name: str) -> bool:
        """Drop an adapter's weights from memory (its slot and its CPU copy) now; it stays
        registered (COLD) and is read again when next needed. Refused (False) while a running
        batch holds it or it is pinned."""
        with self._lock:
            entry = self._known(name)
            if entry.refs > 0 or entry.pinned:
                return False
            old = self._state(entry)
            slot = self._slots.release(name)
            if slot is not None:
                self._dirty[slot] = None
                self._counters.gpu_evictions += 1
            if self._cpu.pop(name, None) is not None:
                self._counters.cpu_evictions += 1
            entry.weights = None
            self._note(entry, old)
        self._dispatch()
        return True

    def source(self, name: str) -> AdapterSource:
        with self._lock:
            return self._known(name).source

    def names(self) -> list:
        """Registered adapters (not unloaded), in registration order."""
        with self._lock:
            return [n for n, e in self._entries.items() if not e.unloaded]

    def __contains__(self, name: object) -> bool:
        """Whether `name` is registered (and not unloaded): one dict lookup, no copy."""
        entry = self._entries.get(name)
        return entry is not None and not entry.unloaded

    def state(self, name: str) -> AdapterState:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise AdapterNotFoundError(self._unknown(name))
            return self._state(entry)

    def describe(self, name: str) -> tuple:
        """(source, CPU weights or None, state) of a registered adapter, read at one moment."""
        with self._lock:
            entry = self._known(name)
            return entry.source, entry.weights, self._state(entry)

    def weights(self, name: str) -> Optional[AdapterWeights]:
        """The CPU copy, if it is in memory (without touching the LRU order)."""
        with self._lock:
            return self._known(name).weights

    # tiers ------------------------------------------------------------------------------------------
    def acquire(self, names: Iterable[str]) -> dict:
        """Give every adapter in `names` a slot, reading from disk what is not in memory, and hold
        them (never evicted) until `release(names)`. Returns {name: slot}.

        Raises `AdapterNotFoundError` (not registered), `AdapterLoadError` / `IncompatibleAdapterError`
        (its files cannot be read or served) or `CapacityError`; then nothing is held.
        """
        return self._bring_in(list(dict.fromkeys(names)), pin=False)

    def release(self, names: Iterable[str]) -> None:
        """Undo one `acquire(names)`."""
        with self._lock:
            for name in dict.fromkeys(names):
                entry = self._entries.get(name)
                if entry is None or entry.refs == 0:
                    raise ValueError(f"release of adapter {name!r}, which is not held")
                entry.refs -= 1
                if entry.refs == 0 and entry.unloaded:
                    self._free(entry, AdapterState.EVICTING)
        self._dispatch()

    def pin(self, name: str) -> int:
        """Keep an adapter in a slot (and in the CPU tier) until `unpin`; returns its slot. Pinning
        every slot is refused: one slot at least stays free for the other adapters."""
        with self._lock:
            self._check_pin(self._known(name))
        return self._bring_in([name], pin=True)[name]

    def unpin(self, name: str) -> None:
        with self._lock:
            self._known(name).pinned = False

    def prefetch(self, names: Iterable[str]) -> dict:
        """Start reading adapters disk → CPU on the prefetch pool. Returns {name: Future}; a future
        is already done for an adapter in memory and fails with the load error for a bad one."""
        futures = {}
        with self._lock:
            for name in dict.fromkeys(names):
                entry = self._known(name)
                if entry.weights is not None:
                    futures[name] = Future()
                    futures[name].set_result(entry.weights)
                elif entry.loading is not None:
                    futures[name] = entry.loading
                else:
                    futures[name] = self._start_load(entry)
                    self._executor().submit(self._load, entry, entry.source, futures[name])
        self._dispatch()
        return futures

    def sync(self) -> None:
        """Write slots whose buffers lag the table. Called at the start of each forward."""
        if not self._dirty:
            return
        with self._lock:
            writes, written = [], {}
            for slot in self._dirty:
                name = self._slots.contents()[slot]
                entry = None if name is EMPTY else self._entries[name]
                held = EMPTY if entry is None else (name, entry.source.version)
                if held != self._written[slot]:
                    writes.append((slot, None if entry is None else entry.weights))
                    written[slot] = held
            if writes:
                self._write(writes)  # if this raises, the slots stay dirty and are written next time
            for slot, held in written.items():
                before = self._written[slot]
                if held is not EMPTY and (before is EMPTY or before[0] != held[0]):
                    self._counters.slot_swaps += 1
                self._written[slot] = held
            self._dirty.clear()

    # introspection ----------------------------------------------------------------------------------
    def contents(self) -> tuple:
        with self._lock:
            return self._slots.contents()

    def cpu_names(self) -> list:
        """Adapters in the CPU tier, least recently used first."""
        with self._lock:
            return list(self._cpu)

    def stats(self) -> CacheStats:
        with self._lock:
            entries = list(self._entries.values())
            in_slots = [self._entries[n] for n in self._slots.contents() if n is not EMPTY]
            return CacheStats(
                registered=sum(not e.unloaded for e in entries),
                pinned=sum(e.pinned for e in entries),
                in_use=sum(e.refs > 0 for e in entries),
                num_slots=self._slots.num_slots,
                slots_used=len(in_slots),
                gpu_bytes=sum(e.weights.num_bytes for e in in_slots),
                slot_buffer_bytes=self._slot_buffer_bytes,
                max_cpu_loras=self.max_cpu_loras,
                cpu_entries=len(self._cpu),
                cpu_bytes=sum(e.weights.num_bytes for e in self._cpu.values()),
                **asdict(self._counters),
            )

    def close(self) -> None:
        """Stop the prefetch pool (reads already running finish)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # internals (the caller holds the lock unless said otherwise) ------------------------------------
    def _bring_in(self, wanted: list, pin: bool) -> dict:
        """acquire / pin: load what is missing (outside the lock), then place everything at once."""
        read: dict = {}  # name → weights this call waited for, re-admitted if evicted meanwhile
        counted = False
        while True:
            with self._lock:
                entries = [self._known(n, in_use_ok=not pin) for n in wanted]
                if not counted:
                    self._count_lookups(entries)
                    counted = True
                for entry in entries:
                    got = read.get(entry.source.name)
                    if entry.weights is None and got is not None and got[0] is entry.source:
                        old = self._state(entry)
                        self._admit(entry, got[1])
                        self._note(entry, old)
                missing = [e for e in entries if e.weights is None]
                if not missing:
                    try:
                        slots = self._place(entries, pin)
                    finally:
                        self._trim_cpu()  # only now: what this call read stays until it is placed
                    break
                jobs = []
                for entry in missing:
                    if entry.loading is None:
                        jobs.append((entry, entry.source, self._start_load(entry)))
                    else:
                        jobs.append((entry, entry.source, entry.loading))
            self._dispatch()
            try:
                for entry, source, future in jobs:
                    self._load(entry, source, future, trim=False)  # returns at once if the pool reads it
                    read[source.name] = (source, future.result())  # raises the load error
            except BaseException:
                with self._lock:
                    self._trim_cpu()
                raise
        self._dispatch()
        return slots

    def _count_lookups(self, entries: list) -> None:
        c = self._counters
        for entry in entries:
            if entry.source.name in self._slots:
                c.gpu_hits += 1
            else:
                c.gpu_misses += 1
                if entry.weights is not None:
                    c.cpu_hits += 1
                else:
                    c.cpu_misses += 1

    def _check_pin(self, entry: _Entry) -> None:
        pinned = sum(e.pinned for e in self._entries.values())
        if not entry.pinned and pinned + 1 >= self._slots.num_slots:
            raise CapacityError(
                f"cannot pin {entry.source.name!r}: {pinned} of the {self._slots.num_slots} slots (max_loras) "
                "are pinned already, and pinning every slot would leave none for other adapters; unpin one "
                "first or raise max_loras"
            )

    def _place(self, entries: list, pin: bool) -> dict:
        if pin:
            self._check_pin(entries[0])
        names = [e.source.name for e in entries]
        before = {e.source.name: self._state(e) for e in entries}
        slots, placed = self._slots.acquire(names, self._protected)
        for slot, name, evicted in placed:
            self._dirty[slot] = None
            if evicted is not EMPTY:
                self._counters.gpu_evictions += 1
                self._emit(evicted, AdapterState.ACTIVE, AdapterState.CPU, slot)
        for entry in entries:
            self._cpu.move_to_end(entry.source.name)
            if pin:
                entry.pinned = True
            else:
                entry.refs += 1
            name = entry.source.name
            self._emit(name, before[name], self._state(entry), slots[name])
        return slots

    def _protected(self, name: str) -> bool:
        entry = self._entries[name]
        return entry.pinned or entry.refs > 0

    def _start_load(self, entry: _Entry) -> _Load:
        old = self._state(entry)
        entry.loading = _Load()
        self._note(entry, old)
        return entry.loading

    def _load(self, entry: _Entry, source: AdapterSource, future: _Load, trim: bool = True) -> None:
        """Read `source` and admit it to the CPU tier if it is still wanted, unless another thread
        claimed the read first. Without `trim` the tier may stay one over its bound until the caller,
        which places the adapter next, trims it. Runs without the lock."""
        with self._lock:
            if future.claimed:
                return
            future.claimed = True
        try:
            weights = self._read(source)
        except Exception as exc:
            if not isinstance(exc, MultiLoRAError):
                exc = AdapterLoadError(f"could not load adapter {source.name!r} from {source.path!r}: {exc!r}")
            with self._lock:
                self._counters.load_errors += 1
                if entry.loading is future:
                    old = self._state(entry)
                    entry.loading = None
                    self._note(entry, old)
            future.set_exception(exc)
            self._dispatch()
            return
        with self._lock:
            self._counters.loads += 1
            if entry.loading is future:  # not unloaded or replaced while reading
                old = self._state(entry)
                entry.loading = None
                self._admit(entry, weights)
                self._note(entry, old)
                if trim:
                    self._trim_cpu()
        future.set_result(weights)
        self._dispatch()

    def _admit(self, entry: _Entry, weights: AdapterWeights) -> None:
        entry.weights = weights
        self._cpu[entry.source.name] = entry
        self._cpu.move_to_end(entry.source.name)

    def _trim_cpu(self) -> None:
        """Drop least recently used CPU copies that no slot holds until the tier fits."""
        excess = len(self._cpu) - self.max_cpu_loras
        if excess <= 0:
            return
        for name in [n for n in self._cpu if n not in self._slots][:excess]:
            entry = self._cpu.pop(name)
            entry.weights = None
            self._counters.cpu_evictions += 1
            self._emit(name, AdapterState.CPU, AdapterState.COLD)

    def _free(self, entry: _Entry, old: AdapterState) -> None:
        name = entry.source.name
        slot = self._slots.release(name)
        if slot is not None:
            self._dirty[slot] = None
        self._cpu.pop(name, None)
        entry.weights = None
        del self._entries[name]
        self._emit(name, old, None, slot)

    def _state(self, entry: _Entry) -> AdapterState:
        if entry.unloaded:
            return AdapterState.EVICTING
        if entry.source.name in self._slots:
            return AdapterState.ACTIVE
        if entry.weights is not None:
            return AdapterState.CPU
        if entry.loading is not None:
            return AdapterState.LOADING
        return AdapterState.COLD

    def _known(self, name: str, in_use_ok: bool = False) -> _Entry:
        entry = self._entries.get(name)
        if entry is None or (entry.unloaded and not (in_use_ok and entry.refs > 0)):
            raise AdapterNotFoundError(self._unknown(name))
        return entry

    def _unknown(self, name: str) -> str:
        return not_registered(name, [n for n, e in self._entries.items() if not e.unloaded])

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._prefetch_workers, thread_name_prefix="multilora-prefetch")
        return self._pool

    # events -----------------------------------------------------------------------------------------
    def _note(self, entry: _Entry, old: AdapterState) -> None:
        new = self._state(entry)
        self._emit(entry.source.name, old, new, self._slots.slot_of(entry.source.name))

    def _emit(self, name: str, old, new, slot: Optional[int] = None) -> None:
        if old != new:
            self._events.append(AdapterEvent(name, old, new, slot))

    def _dispatch(self) -> None:
        """Send queued events to the listeners, in order, outside the lock."""
        with self._dispatch_lock:
            while True:
                with self._lock:
                    if not self._events:
                        return
                    event = self._events.popleft()
                for listener in list(self.listeners):
                    try:
                        listener(event)
                    except Exception:  # an observer never breaks the cache
                        logger.exception("adapter event listener %r failed on %s", listener, event)
