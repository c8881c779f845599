"""The adapter cache: disk → CPU LRU (`max_cpu_loras`) → GPU slots (`lora_memory` bytes, at most
`max_loras` adapters). It owns residency.

The slot tier is bounded by bytes: each content takes `size(weights)` (what the model's slot memory
needs for it, at its own rank, nothing padded), and placing contents evicts least recently used ones
until enough bytes (and slots) are free. `fits` answers by the same sizes; for an adapter not yet
read it uses the bytes per rank of the contents seen so far.

Contents, not names, live in slots. Every distinct content a name ever holds (a load, a hot replace, a
read after an unload and a new register, weights from a plugin) gets an id never handed out twice in
the process; each slot records the id its buffers were written with, `sync()` writes a slot whenever
the two differ, and a slot whose content was freed is unknown until written again. A re-read of
unchanged files (`files_fingerprint`) keeps the previous id, so ids stay stable for observers;
correctness never rests on it, since a re-read only follows a free.

`acquire(names)` holds the current content of each name in its slot until `release(hold)`, even when
the name is replaced, unloaded or registered again meanwhile: the new content takes another slot, and
the old one is freed by its last release, so a running request finishes on the weights it started
with. A replace of a content nobody holds lands in the same slot at the next `sync()`. Tiers are
inclusive (a content in a slot keeps its CPU copy); only older contents still held may take the CPU
tier past its bound. Per name the state (COLD, LOADING, CPU, ACTIVE, EVICTING) is derived from these
tables, and every change is an `AdapterEvent` sent to the listeners. docs/architecture.md has the rules.

Threads: any method from any thread; one lock guards the tables. Disk reads run outside it, on the
thread that needs the adapter or on the prefetch pool, one at a time per adapter (later callers wait
for the same future). Slot buffers are written only by `sync()`, which the model calls at the start of
each forward, so nothing done meanwhile (by another thread, or a hook) lands during one.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Collection, Iterable, Optional, Sequence

from ..errors import AdapterExistsError, AdapterNotFoundError, CapacityError
from .checkpoint import AdapterWeights
from .contents import Content, Entry, new_content_id
from .reads import Load, Reader, Reads
from .registry import AdapterSource
from .slots import EMPTY, SlotTable
from .state import AdapterState, CacheStats, Counters, EventQueue, Hold, not_registered

Writer = Callable[[Sequence[tuple]], None]  # [(slot, AdapterWeights or None), ...]


class AdapterCache:
    """Registered adapters and where their weights are. See the module docstring."""

    def __init__(self, *, num_slots: int, max_cpu_loras: int, read: Reader, write: Writer,
                 capacity: Optional[int] = None, size: Callable[[AdapterWeights], int] = lambda w: w.num_bytes,
                 memory: Callable[[], dict] = dict, prefetch_workers: int = 2) -> None:
        if max_cpu_loras < num_slots:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) should be >= the number of slots ({num_slots})")
        self.max_cpu_loras = max_cpu_loras
        self._lock = threading.RLock()
        self._events = EventQueue(self._lock)
        self.listeners = self._events.listeners  # called with each AdapterEvent, outside the lock
        self.residency = self  # what the scheduler may ask (`scheduler.Residency`): is_resident, fits
        self._reads, self._write = Reads(read, prefetch_workers), write
        self._size = size  # bytes a content takes in slot memory
        self._memory = memory  # {"reserved": bytes, "fragmentation": float} of the slot memory
        self._per_rank = 0  # bytes per rank of the latest content read (sizes adapters not read yet)
        self._entries: dict = {}  # name → Entry, every registered adapter
        self._cpu: OrderedDict = OrderedDict()  # name → Entry whose content is in memory, least recent first
        self._live: dict = {}  # content id → Content in memory: current ones, and older ones still held
        self._slots = SlotTable(num_slots, label=lambda cid: self._live[cid].name, capacity=capacity,
                                size=lambda cid: self._live[cid].size)
        self._counters = Counters()

    # registry ---------------------------------------------------------------------------------------
    def register(self, source: AdapterSource, weights: Optional[AdapterWeights] = None, replace: bool = False) -> None:
        """Add an adapter (COLD, or CPU when its `weights` are given). A name that was unloaded may be
        registered again at once, even while a batch still holds its old content. With `replace`, an
        adapter of that name gets the new source (its version one higher) and weights: batches that
        hold the old content keep it; the others, and every later one, get the new content."""
        if replace and weights is None:
            raise ValueError("replacing an adapter needs its new weights")
        name = source.name
        if weights is not None:
            self._slots.check_size(name, self._size(weights))
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and not replace:
                raise AdapterExistsError(
                    f"an adapter named {name!r} is already registered (from {entry.source.path!r}); "
                    "unload it first, pick another name, or pass replace=True"
                )
            if entry is None:
                entry = self._entries[name] = Entry(dataclasses.replace(source, version=1))
                self._events.emit(name, AdapterState.EVICTING if self._older_held(name) else None, AdapterState.COLD)
            else:
                entry.source = dataclasses.replace(source, version=entry.source.version + 1)
            old = self._state(entry)
            entry.loading = None  # a read of an older source still running is dropped
            if weights is not None:
                self._admit(entry, weights, reread=False)
                self._trim_cpu()
            self._note(entry, old)
        self._events.dispatch()

    def unregister(self, name: str) -> None:
        """Unload: the name is forgotten now (and may be registered again); its content's slot and CPU
        copy are freed now, or by the release of the last batch that holds it (EVICTING until then)."""
        with self._lock:
            entry = self._known(name)
            old = self._state(entry)
            del self._entries[name]
            self._cpu.pop(name, None)
            entry.loading, entry.pinned = None, False
            slot = None
            if entry.content is not None:
                slot = self._slots.slot_of(entry.content.id)
                self._retire(entry.content)
            self._events.emit(name, old, AdapterState.EVICTING if self._older_held(name) else None, slot)
        self._events.dispatch()

    def evict(self, name: str) -> bool:
        """Drop an adapter's weights from memory (its slot and its CPU copy) now; it stays
        registered (COLD) and is read again when next needed. Refused (False) while a running
        batch holds its current content or it is pinned."""
        with self._lock:
            entry = self._known(name)
            content = entry.content
            if entry.pinned or (content is not None and content.refs > 0):
                return False
            old = self._state(entry)
            if content is not None:
                self._counters.gpu_evictions += content.id in self._slots
                self._counters.cpu_evictions += 1
                self._cpu.pop(name)
                entry.content = None
                self._retire(content)
            self._note(entry, old)
        self._events.dispatch()
        return True

    def source(self, name: str) -> AdapterSource:
        with self._lock:
            return self._known(name).source

    def names(self) -> list:
        """Registered adapters, in registration order."""
        with self._lock:
            return list(self._entries)

    def paths(self) -> dict:
        """{name: adapter directory} of every registered adapter, read at one moment."""
        with self._lock:
            return {name: entry.source.path for name, entry in self._entries.items()}

    def __contains__(self, name: object) -> bool:
        """Whether `name` is registered: one dict lookup, no copy."""
        return name in self._entries

    def state(self, name: str) -> AdapterState:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                return self._state(entry)
            if self._older_held(name):
                return AdapterState.EVICTING
            raise AdapterNotFoundError(self._unknown(name))

    def describe(self, name: str) -> tuple:
        """(source, CPU weights or None, state, current content id or None) of a registered
        adapter, read at one moment."""
        with self._lock:
            entry = self._known(name)
            content = entry.content
            return (entry.source, None if content is None else content.weights, self._state(entry),
                    None if content is None else content.id)

    def weights(self, name: str) -> Optional[AdapterWeights]:
        """The CPU copy of its current content, if it is in memory (without touching the LRU order)."""
        with self._lock:
            content = self._known(name).content
            return None if content is None else content.weights

    # tiers ------------------------------------------------------------------------------------------
    def acquire(self, names: Iterable[str]) -> Hold:
        """Give the current content of every adapter in `names` a slot, reading from disk what is
        not in memory, and hold it there (never evicted, never changed) until `release(hold)`.

        Raises `AdapterNotFoundError` (not registered), `AdapterLoadError` / `IncompatibleAdapterError`
        (its files cannot be read or served) or `CapacityError`; then nothing is held.
        """
        return self._bring_in(list(dict.fromkeys(names)), pin=False)

    def release(self, hold: Hold) -> None:
        """Undo one `acquire`. A content that is no longer its name's current one is freed by its
        last release (a pinned adapter's new content then takes over its slot)."""
        with self._lock:
            if hold.released:
                raise ValueError(f"release of {hold!r}, which was released already")
            hold.released = True
            for content in hold.contents:
                content.refs -= 1
                if content.refs == 0 and not self._is_current(content):
                    self._release_older(content)
        self._events.dispatch()

    def pin(self, name: str) -> int:
        """Keep an adapter in a slot (and in the CPU tier) until `unpin`; returns its slot. Pinning
        every slot is refused: one slot at least stays free for the other adapters."""
        with self._lock:
            self._check_pin(self._known(name))
        return self._bring_in([name], pin=True)

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
                if entry.content is not None:
                    futures[name] = Future()
                    futures[name].set_result(entry.content.weights)
                elif entry.loading is not None:
                    futures[name] = entry.loading
                else:
                    futures[name] = self._start_load(entry)
                    self._reads.submit(self._load, entry, entry.source, futures[name])
        self._events.dispatch()
        return futures

    def sync(self) -> None:
        """Write slots whose buffers lag the table. Called at the start of each forward."""
        if not self._slots.lagging:
            return
        with self._lock:
            self._counters.slot_swaps += self._slots.sync(lambda cid: self._live[cid].weights, self._write)

    # residency, as the scheduler asks it (`scheduler.Residency`) -----------------------------------
    def is_resident(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and entry.content is not None and entry.content.id in self._slots

    def fits(self, names: Collection[str]) -> bool:
        """Whether `names` can be in slots together beside the held and pinned contents. An adapter
        larger than the whole budget counts as fitting: its `acquire` fails it alone, with the reason."""
        with self._lock:
            needed = set(names)
            kept = [cid for cid in self._slots.resident() if self._protected(cid)
                    and not (self._live[cid].name in needed and self._is_current(self._live[cid]))]
            capacity = self._slots.capacity if self._slots.capacity is not None else float("inf")
            known, guessed = [], []
            for name in needed:
                entry = self._entries.get(name)
                if entry is not None and entry.content is not None:
                    if entry.content.size <= capacity:
                        known.append(entry.content.id)
                    else:
                        guessed.append(0)
                else:
                    guess = self._per_rank * (entry.source.rank if entry is not None else 0)
                    guessed.append(guess if guess <= capacity else 0)
            return self._slots.fits(known, kept, guessed)

    # introspection ----------------------------------------------------------------------------------
    def contents(self) -> tuple:
        """Slot i → the name of the adapter whose content it holds, or EMPTY."""
        with self._lock:
            return tuple(c if c is EMPTY else self._live[c].name for c in self._slots.contents())

    def content_ids(self) -> tuple:
        """Slot i → the id of the content it holds, or EMPTY."""
        with self._lock:
            return self._slots.contents()

    def cpu_names(self) -> list:
        """Adapters with a content in CPU memory, least recently used first (first of all those
        whose content is an older one, still held by a batch)."""
        with self._lock:
            older = [c.name for c in self._live.values() if not self._is_current(c)]
            return list(dict.fromkeys(older + list(self._cpu)))

    def stats(self) -> CacheStats:
        memory = self._memory()
        with self._lock:
            return CacheStats.of(list(self._entries.values()), list(self._live.values()),
                                 [self._live[c] for c in self._slots.resident()], self._slots, self.max_cpu_loras,
                                 memory, self._counters)

    def close(self) -> None:
        """Stop the prefetch pool (reads already running finish)."""
        self._reads.close()

    # internals (the caller holds the lock unless said otherwise) ------------------------------------
    def _bring_in(self, wanted: list, pin: bool):
        """acquire / pin: load what is missing (outside the lock), then place everything at once."""
        read: dict = {}  # name → (source, weights) this call waited for, admitted if dropped meanwhile
        counted = False
        while True:
            with self._lock:
                entries = [self._known(n) for n in wanted]
                if not counted:
                    self._counters.count_lookups(entries, self._slots)
                    counted = True
                for entry in entries:
                    got = read.get(entry.source.name)
                    if entry.content is None and got is not None and got[0] is entry.source:
                        old = self._state(entry)
                        self._admit(entry, got[1], reread=True)
                        self._note(entry, old)
                missing = [e for e in entries if e.content is None]
                if not missing:
                    try:
                        placed = self._place(entries, pin)
                    finally:
                        self._trim_cpu()  # only now: what this call read stays until it is placed
                    break
                jobs = [(e, e.source, e.loading if e.loading is not None else self._start_load(e)) for e in missing]
            self._events.dispatch()
            try:
                for entry, source, future in jobs:
                    self._load(entry, source, future, trim=False)  # returns at once if the pool reads it
                    read[source.name] = (source, future.result())  # raises the load error
            except BaseException:
                with self._lock:
                    self._trim_cpu()
                raise
        self._events.dispatch()
        return placed

    def _check_pin(self, entry: Entry) -> None:
        pinned = sum(e.pinned for e in self._entries.values())
        if not entry.pinned and pinned + 1 >= self._slots.num_slots:
            raise CapacityError(
                f"cannot pin {entry.source.name!r}: {pinned} of the {self._slots.num_slots} slots (max_loras) "
                "are pinned already, and pinning every slot would leave none for other adapters; unpin one "
                "first or raise max_loras"
            )

    def _place(self, entries: list, pin: bool):
        """Put the current contents of `entries` in slots; pin the one entry, or hold them all."""
        if pin:
            self._check_pin(entries[0])
        before = {e.source.name: self._state(e) for e in entries}
        slots, _, evicted = self._slots.acquire([e.content.id for e in entries], self._protected)
        for slot, cid in evicted:  # always a current content: an older one in a slot is held
            self._counters.gpu_evictions += 1
            self._events.emit(self._live[cid].name, AdapterState.ACTIVE, AdapterState.CPU, slot)
        for entry in entries:
            name = entry.source.name
            self._cpu.move_to_end(name)
            if pin:
                entry.pinned = True
            else:
                entry.content.refs += 1
            self._events.emit(name, before[name], self._state(entry), slots[entry.content.id])
        if pin:
            return slots[entries[0].content.id]
        return Hold({e.source.name: slots[e.content.id] for e in entries},
                    {e.source.name: e.content.id for e in entries}, [e.content for e in entries])

    def _protected(self, content_id: int) -> bool:
        content = self._live[content_id]
        if content.refs > 0:
            return True
        entry = self._entries.get(content.name)
        return entry is not None and entry.pinned and entry.content is content

    def _start_load(self, entry: Entry) -> Load:
        old = self._state(entry)
        entry.loading = Load()
        self._note(entry, old)
        return entry.loading

    def _load(self, entry: Entry, source: AdapterSource, future: Load, trim: bool = True) -> None:
        """Read `source` and admit it to the CPU tier if it is still wanted, unless another thread
        claimed the read first. Without `trim` the tier may stay one over its bound until the caller,
        which places the adapter next, trims it. Runs without the lock."""
        outcome = self._reads.run(source, future)
        if outcome is None:
            return
        weights, error = outcome
        with self._lock:
            self._counters.loads += error is None
            self._counters.load_errors += error is not None
            if entry.loading is future:  # not unloaded or replaced while reading
                old = self._state(entry)
                entry.loading = None
                if error is None and entry.content is None:  # not admitted meanwhile by a waiter
                    self._admit(entry, weights, reread=True)
                    if trim:
                        self._trim_cpu()
                self._note(entry, old)
        if error is None:
            future.set_result(weights)
        else:
            future.set_exception(error)
        self._events.dispatch()

    def _admit(self, entry: Entry, weights: AdapterWeights, reread: bool) -> None:
        """Make `weights` the current content of `entry`, in the CPU tier. A re-read of files whose
        fingerprint is that of the latest content keeps its id; anything else is a new content."""
        last, fingerprint = entry.last_read, weights.fingerprint
        same = (reread and fingerprint is not None and last is not None and last[:2] == (entry.source, fingerprint)
                and last[2] not in self._live)
        content = Content(last[2] if same else new_content_id(), entry.source, weights, self._size(weights))
        if entry.source.rank:
            self._per_rank = content.size // entry.source.rank
        entry.last_read = (entry.source, fingerprint, content.id)
        previous, entry.content = entry.content, content
        self._live[content.id] = content
        self._cpu[entry.source.name] = entry
        self._cpu.move_to_end(entry.source.name)
        if previous is not None:
            self._retire(previous, heir=content)

    def _retire(self, content: Content, heir: Optional[Content] = None) -> None:
        """`content` stopped being its name's current content. Unless a batch holds it, it leaves
        memory now, and its slot goes to `heir` (a replace lands in place) or is freed."""
        if content.refs > 0:
            return  # freed by its last release
        slot = self._slots.slot_of(content.id)
        in_place = slot is not None and heir is not None and \
            self._slots.swap(content.id, heir.id, heir.size - content.size) is not None
        if slot is not None and not in_place:  # no heir, or one that does not fit in the bytes left
            self._slots.release(content.id)
        del self._live[content.id]

    def _release_older(self, content: Content) -> None:
        """The last holder of a content that is no longer current let it go."""
        entry = self._entries.get(content.name)
        heir = None
        if entry is not None and entry.pinned and entry.content is not None and entry.content.id not in self._slots:
            heir = entry.content  # a pinned adapter replaced while held: its new content takes the slot
        old = None if entry is None else self._state(entry)
        slot = self._slots.slot_of(content.id)
        self._retire(content, heir)
        if entry is not None:
            self._note(entry, old)
        elif not self._older_held(content.name):
            self._events.emit(content.name, AdapterState.EVICTING, None, slot)

    def _trim_cpu(self) -> None:
        """Drop least recently used CPU copies that no slot holds until the tier fits."""
        excess = len(self._live) - self.max_cpu_loras
        if excess <= 0:
            return
        droppable = [n for n, e in self._cpu.items() if e.content.id not in self._slots and not e.pinned]
        for name in droppable[:excess]:
            entry = self._cpu.pop(name)
            del self._live[entry.content.id]
            entry.content = None
            self._counters.cpu_evictions += 1
            self._events.emit(name, AdapterState.CPU, AdapterState.COLD)

    def _is_current(self, content: Content) -> bool:
        entry = self._entries.get(content.name)
        return entry is not None and entry.content is content

    def _older_held(self, name: str) -> bool:
        """Whether a batch still holds a content of `name` that is no longer its current one."""
        return any(c.name == name and not self._is_current(c) for c in self._live.values())

    def _state(self, entry: Entry) -> AdapterState:
        if entry.content is not None:
            return AdapterState.ACTIVE if entry.content.id in self._slots else AdapterState.CPU
        if entry.loading is not None:
            return AdapterState.LOADING
        return AdapterState.COLD

    def _known(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(self._unknown(name))
        return entry

    def _unknown(self, name: str) -> str:
        return not_registered(name, self._entries)

    # events -----------------------------------------------------------------------------------------
    def _note(self, entry: Entry, old: AdapterState) -> None:
        new = self._state(entry)
        slot = None if entry.content is None else self._slots.slot_of(entry.content.id)
        self._events.emit(entry.source.name, old, new, slot)
