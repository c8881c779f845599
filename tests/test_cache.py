"""AdapterCache on its own, with an in-memory reader and a recording slot writer: tier contents after
each operation, lifecycle events, counters, faults, threads, and a hypothesis state machine."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from peft import LoraConfig

from multilora_plugin import EMPTY, AdapterEvent, AdapterLoadError, AdapterNotFoundError, AdapterState, CapacityError
from multilora_plugin.adapters import AdapterCache, AdapterSource, AdapterWeights, ModuleWeights

E = EMPTY
S = AdapterState
CONFIG = LoraConfig(r=4, lora_alpha=8)
BYTES = 4 * (4 * 8 + 8 * 4)  # one module: A [4, 8] + B [8, 4] in fp32


def source(name: str, version: int = 1) -> AdapterSource:
    return AdapterSource(name, f"/adapters/{name}", CONFIG, version)


def weights_for(src: AdapterSource, generation: int = 0) -> AdapterWeights:
    """Weights tagged 'name@vN' (+G for the G-th rewrite of its files); the tag is their `path`."""
    a = torch.full((4, 8), float(src.version))
    tag = f"{src.name}@v{src.version}" + (f"+{generation}" if generation else "")
    return AdapterWeights(src.name, tag, CONFIG, {"m": ModuleWeights(a, a.T.clone())}, fingerprint=(generation,))


class Disk:
    """The reader: counts reads, fails for names in `broken`, can be slowed down; `generation[name]`
    counts rewrites of an adapter's files."""

    def __init__(self, delay: float = 0.0) -> None:
        self.reads: Counter = Counter()
        self.generation: Counter = Counter()
        self.broken: set = set()
        self.delay = delay
        self.reading: set = set()
        self.overlaps = 0
        self.lock = threading.Lock()

    def __call__(self, src: AdapterSource) -> AdapterWeights:
        with self.lock:
            self.reads[src.name] += 1
            self.overlaps += src.name in self.reading
            self.reading.add(src.name)
        try:
            if self.delay:
                time.sleep(self.delay)
            if src.name in self.broken:
                raise OSError(f"[Errno 2] No such file or directory: '{src.path}/adapter_model.safetensors'")
            return weights_for(src, self.generation[src.name])
        finally:
            with self.lock:
                self.reading.discard(src.name)


class Slots:
    """The writer: what each slot buffer holds, as 'name@vN' or EMPTY."""

    def __init__(self, num_slots: int) -> None:
        self.held: list = [E] * num_slots
        self.writes = 0

    def __call__(self, writes) -> None:
        for slot, w in writes:
            self.held[slot] = E if w is None else w.path
            self.writes += 1


def make_cache(num_slots=2, max_cpu=3, names="abcde", delay=0.0):
    disk, slots = Disk(delay), Slots(num_slots)
    cache = AdapterCache(num_slots=num_slots, max_cpu_loras=max_cpu, read=disk, write=slots)
    events = []
    cache.listeners.append(events.append)
    for name in names:
        cache.register(source(name))
    return cache, disk, slots, events


def apply(cache: AdapterCache, op: str, arg, holds: dict):
    """One operation; `holds` keeps the holds of "hold" steps (by their names) for "release"."""
    if op == "use":  # one batch runs with these adapters
        cache.release(cache.acquire(arg))
    elif op == "hold":
        holds[tuple(arg)] = cache.acquire(arg)
    elif op == "release":
        cache.release(holds.pop(tuple(arg)))
    elif op == "pin":
        cache.pin(arg)
    elif op == "unpin":
        cache.unpin(arg)
    elif op == "unload":
        cache.unregister(arg)
    elif op == "evict":
        assert cache.evict(arg[0]) is arg[1]
    elif op == "prefetch":
        for future in cache.prefetch(arg).values():
            future.result()
    else:
        raise AssertionError(op)


# (num_slots, max_cpu_loras, steps); step = (op, argument, slot contents after, CPU tier after, LRU first)
SCENARIOS = {
    "empty cache": (2, 3, []),
    "eviction order at both tiers": (2, 3, [
        ("use", ["a"], ("a", E), ["a"]),
        ("use", ["b"], ("a", "b"), ["a", "b"]),
        ("use", ["c"], ("c", "b"), ["a", "b", "c"]),  # slot LRU: a; the CPU tier keeps a
        ("use", ["d"], ("c", "d"), ["b", "c", "d"]),  # slot LRU: b; CPU LRU without a slot: a
        ("use", ["a"], ("a", "d"), ["c", "d", "a"]),  # a is read again; c leaves the slot, b the CPU
        ("use", ["d", "a"], ("a", "d"), ["c", "d", "a"]),
    ]),
    "pinned adapter never leaves": (2, 2, [
        ("pin", "a", ("a", E), ["a"]),
        ("use", ["b"], ("a", "b"), ["a", "b"]),
        ("use", ["c"], ("a", "c"), ["a", "c"]),
        ("use", ["d"], ("a", "d"), ["a", "d"]),
        ("unpin", "a", ("a", "d"), ["a", "d"]),
        ("use", ["e"], ("e", "d"), ["d", "e"]),  # unpinned and least recent: evicted at both tiers
    ]),
    "held adapter never leaves": (2, 4, [
        ("hold", ["a"], ("a", E), ["a"]),
        ("use", ["b"], ("a", "b"), ["a", "b"]),
        ("use", ["c"], ("a", "c"), ["a", "b", "c"]),
        ("release", ["a"], ("a", "c"), ["a", "b", "c"]),
        ("use", ["d"], ("d", "c"), ["a", "b", "c", "d"]),
    ]),
    "prefetch fills the CPU tier only": (2, 3, [  # one name per step: reads finish in any order
        ("prefetch", ["a"], (E, E), ["a"]),
        ("prefetch", ["b"], (E, E), ["a", "b"]),
        ("use", ["b"], ("b", E), ["a", "b"]),
        ("prefetch", ["c"], ("b", E), ["a", "b", "c"]),
        ("prefetch", ["d"], ("b", E), ["b", "c", "d"]),  # the tier is full: a, least recent, is dropped
    ]),
    "unload frees both tiers": (2, 3, [
        ("use", ["a", "b"], ("a", "b"), ["a", "b"]),
        ("unload", "a", (E, "b"), ["b"]),
        ("use", ["c"], ("c", "b"), ["b", "c"]),
    ]),
    "evict frees both tiers but keeps the adapter registered": (2, 3, [
        ("use", ["a"], ("a", E), ["a"]),
        ("use", ["b"], ("a", "b"), ["a", "b"]),
        ("evict", ("a", True), (E, "b"), ["b"]),
        ("hold", ["b"], (E, "b"), ["b"]),
        ("evict", ("b", False), (E, "b"), ["b"]),  # refused while a batch holds it
        ("release", ["b"], (E, "b"), ["b"]),
        ("evict", ("b", True), (E, E), []),
        ("use", ["a"], ("a", E), ["a"]),  # read from disk again
    ]),
    "unload while in use waits for the release": (2, 3, [
        ("hold", ["a"], ("a", E), ["a"]),
        ("unload", "a", ("a", E), ["a"]),
        ("release", ["a"], (E, E), []),
    ]),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tier_contents_after_each_operation(scenario):
    num_slots, max_cpu, steps = SCENARIOS[scenario]
    cache, _, slots, _ = make_cache(num_slots, max_cpu)
    assert cache.contents() == (E,) * num_slots and cache.cpu_names() == []
    holds = {}
    for op, arg, want_slots, want_cpu in steps:
        apply(cache, op, arg, holds)
        assert (cache.contents(), cache.cpu_names()) == (want_slots, want_cpu), (op, arg)
        cache.sync()
        assert tuple(slots.held) == tuple(E if n is E else f"{n}@v1" for n in want_slots)
    cache.close()


def test_states_follow_the_lifecycle():
    cache, _, _, events = make_cache(2, 2, names="ab")
    assert [cache.state(n) for n in "ab"] == [S.COLD, S.COLD]
    hold = cache.acquire(["a"])
    assert cache.state("a") is S.ACTIVE
    cache.unregister("a")
    assert cache.state("a") is S.EVICTING and "a" not in cache.names()
    with pytest.raises(AdapterNotFoundError):
        cache.acquire(["a"])
    cache.release(hold)
    with pytest.raises(AdapterNotFoundError, match=r"adapter 'a' is not registered \(1 registered: 'b'\)"):
        cache.state("a")
    assert [(e.name, e.old, e.new, e.slot) for e in events] == [
        ("a", None, S.COLD, None), ("b", None, S.COLD, None),
        ("a", S.COLD, S.LOADING, None), ("a", S.LOADING, S.CPU, None), ("a", S.CPU, S.ACTIVE, 0),
        ("a", S.ACTIVE, S.EVICTING, 0), ("a", S.EVICTING, None, 0),
    ]


def test_register_again_while_the_old_content_is_held():
    """An unloaded name can be registered again at once: the batch that holds the old content keeps
    it in its slot; the new registration is a new content, in another slot, from its own source."""
    cache, _, slots, events = make_cache(2, 2, names="a")
    old = cache.acquire(["a"])
    cache.sync()
    cache.unregister("a")
    events.clear()
    cache.register(AdapterSource("a", "/adapters/a-new", CONFIG))
    assert cache.state("a") is S.COLD and events[0] == AdapterEvent("a", S.EVICTING, S.COLD)
    new = cache.acquire(["a"])
    cache.sync()
    assert new.slots["a"] != old.slots["a"] and new.content_ids["a"] != old.content_ids["a"]
    assert slots.held[old.slots["a"]] == "a@v1" and cache.weights("a").path == "a@v1"  # same version, new source
    assert cache.contents() == ("a", "a") and cache.stats().in_use == 2
    cache.release(old)
    cache.sync()
    assert cache.content_ids()[old.slots["a"]] is E and slots.held[old.slots["a"]] is E
    assert cache.state("a") is S.ACTIVE and cache.stats().cpu_entries == 1
    cache.release(new)
    with pytest.raises(ValueError, match="released already"):
        cache.release(new)


def test_eviction_events_name_the_tier_left():
    cache, _, _, events = make_cache(1, 1, names="ab")
    apply(cache, "use", ["a"], {})
    events.clear()
    apply(cache, "use", ["b"], {})
    assert [(e.name, e.old, e.new, e.slot) for e in events] == [
        ("b", S.COLD, S.LOADING, None), ("b", S.LOADING, S.CPU, None),
        ("a", S.ACTIVE, S.CPU, 0), ("b", S.CPU, S.ACTIVE, 0), ("a", S.CPU, S.COLD, None),
    ]


def test_counters():
    cache, _, slots, _ = make_cache(2, 3)
    for names in (["a"], ["a"], ["b"], ["c"], ["a", "c"], ["d"]):
        apply(cache, "use", names, {})
        cache.sync()
    stats = cache.stats()
    # a: miss(disk), hit; b: miss(disk); c: miss(disk) evicting a; a+c: a miss(cpu) evicting b, c hit;
    # d: miss(disk) evicting c; CPU tier (3): a, b, c, d → b dropped
    assert (stats.gpu_hits, stats.gpu_misses, stats.cpu_hits, stats.cpu_misses) == (2, 5, 1, 4)
    assert (stats.loads, stats.gpu_evictions, stats.cpu_evictions, stats.slot_swaps) == (4, 3, 1, 5)
    assert (stats.slots_used, stats.gpu_bytes, stats.cpu_entries, stats.cpu_bytes) == (2, 2 * BYTES, 3, 3 * BYTES)
    assert stats.registered == 5 and slots.writes == 5


def test_pinning_every_slot_is_refused():
    cache, _, _, _ = make_cache(2, 2)
    cache.pin("a")
    cache.pin("a")  # pinning twice is one pin
    with pytest.raises(CapacityError, match=r"cannot pin 'b': 1 of the 2 slots \(max_loras\) are pinned"):
        cache.pin("b")
    assert cache.contents() == ("a", E) and cache.stats().pinned == 1
    single, _, _, _ = make_cache(1, 1)
    with pytest.raises(CapacityError, match="pinning every slot"):
        single.pin("a")
    assert single.contents() == (E,) and single.state("a") is S.COLD


def test_capacity_error_holds_nothing():
    cache, _, _, _ = make_cache(2, 4)
    hold = cache.acquire(["a", "b"])
    with pytest.raises(CapacityError, match=r"taken by \['a', 'b'\], pinned or in use"):
        cache.acquire(["c"])
    assert cache.stats().in_use == 2 and cache.contents() == ("a", "b")
    cache.release(hold)
    apply(cache, "use", ["c"], {})
    assert cache.stats().in_use == 0


def test_a_broken_adapter_fails_alone_and_can_be_retried():
    cache, disk, _, _ = make_cache(2, 3)
    apply(cache, "use", ["a"], {})
    disk.broken.add("b")
    with pytest.raises(AdapterLoadError, match=r"could not load adapter 'b' from '/adapters/b'.*No such file"):
        cache.acquire(["a", "b"])
    futures = cache.prefetch(["b", "c"])
    with pytest.raises(AdapterLoadError):
        futures["b"].result()
    assert futures["c"].result().name == "c"
    assert cache.state("b") is S.COLD and cache.stats().in_use == 0 and cache.stats().load_errors == 2
    apply(cache, "use", ["a", "c"], {})
    disk.broken.clear()  # the files are back: the next request reads them
    apply(cache, "use", ["b"], {})
    assert cache.state("b") is S.ACTIVE


def test_replace_lands_in_place_at_the_next_sync():
    cache, _, slots, events = make_cache(2, 2, names="a")
    cache.release(cache.acquire(["a"]))
    cache.sync()
    assert slots.held[0] == "a@v1"
    cache.register(source("a", 2), weights_for(source("a", 2)), replace=True)
    assert slots.held[0] == "a@v1"  # a forward running now keeps reading version 1
    cache.sync()
    assert slots.held[0] == "a@v2" and cache.source("a").version == 2 and cache.state("a") is S.ACTIVE
    assert cache.stats().slot_swaps == 1  # same adapter, new weights: not a swap


def test_replace_while_held_keeps_the_holder_on_the_old_content():
    cache, _, slots, _ = make_cache(2, 2, names="a")
    old = cache.acquire(["a"])
    cache.sync()
    cache.register(source("a", 2), weights_for(source("a", 2)), replace=True)
    cache.sync()
    assert slots.held[old.slots["a"]] == "a@v1" and cache.state("a") is S.CPU
    new = cache.acquire(["a"])
    cache.sync()
    assert slots.held[new.slots["a"]] == "a@v2" and new.slots["a"] != old.slots["a"]
    cache.release(old)
    cache.sync()
    assert slots.held[old.slots["a"]] is E and cache.contents() == tuple(
        "a" if i == new.slots["a"] else E for i in range(2))
    cache.release(new)


def test_a_pinned_adapter_replaced_while_held_takes_its_slot_back():
    cache, _, slots, _ = make_cache(3, 3, names="ab")
    slot = cache.pin("a")
    old = cache.acquire(["a"])
    cache.register(source("a", 2), weights_for(source("a", 2)), replace=True)
    cache.release(cache.acquire(["b"]))  # would evict the new content if it were not pinned
    cache.release(old)
    cache.sync()
    assert cache.contents()[slot] == "a" and slots.held[slot] == "a@v2" and cache.state("a") is S.ACTIVE


def test_evict_marks_the_slot_unknown_so_a_reread_rewrites_it():
    """Evict, then read again before any forward: the same slot is rewritten with what was read."""
    cache, disk, slots, _ = make_cache(2, 2, names="a")
    cache.release(cache.acquire(["a"]))
    cache.sync()
    assert cache.evict("a")
    disk.generation["a"] = 1  # the files changed on disk
    hold = cache.acquire(["a"])
    cache.sync()
    assert hold.slots["a"] == 0 and slots.held[0] == "a@v1+1"
    cache.release(hold)


def test_replace_while_loading_drops_the_old_read():
    cache, disk, _, _ = make_cache(2, 2, names="a", delay=0.05)
    future = cache.prefetch(["a"])["a"]
    assert cache.state("a") is S.LOADING
    cache.register(source("a", 2), weights_for(source("a", 2)), replace=True)
    future.result()
    assert cache.weights("a").path == "a@v2" and cache.state("a") is S.CPU
    cache.close()


def test_concurrent_users_read_each_adapter_once():
    cache, disk, _, _ = make_cache(4, 8, names="abcdef", delay=0.01)
    errors = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(30):
                names = rng.sample("abcdef", rng.randint(1, 2))
                if rng.random() < 0.4:
                    cache.prefetch(names)
                else:
                    try:
                        hold = cache.acquire(names)
                    except CapacityError:
                        continue
                    cache.release(hold)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    assert errors == []
    assert disk.overlaps == 0 and set(disk.reads.values()) == {1}, disk.reads
    assert cache.stats().in_use == 0 and cache.stats().loads == 6


def test_concurrent_users_read_once_per_residency():
    cache, disk, _, events = make_cache(2, 2, names="abcdef")
    starts = Counter()
    cache.listeners.append(lambda e: e.new is S.LOADING and starts.update([e.name]))

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            name = rng.choice("abcdef")
            if rng.random() < 0.5:
                cache.prefetch([name])
            else:
                try:
                    cache.release(cache.acquire([name]))
                except CapacityError:
                    pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    assert disk.overlaps == 0 and disk.reads == starts
    assert cache.stats().cpu_entries <= 2


class CacheMachine(RuleBasedStateMachine):
    """Random register / use / hold / release / pin / unpin / unload / evict / replace / prefetch /
    rewrite-files / reload-under-the-same-name sequences. After every step (and a `sync`, as at the
    start of a forward), each slot's buffers hold exactly the content the cache says it holds; every
    batch still holds the content it acquired; a name's current content is the one last published
    for it (a replace, or its files as they were when last read since the last evict or register)."""

    NAMES = ["a", "b", "c", "d", "e", "f"]

    def __init__(self) -> None:
        super().__init__()
        self.disk, self.slots = Disk(), Slots(3)
        self.cache = AdapterCache(num_slots=3, max_cpu_loras=4, read=self.disk, write=self.slots)
        self.registered: dict = {}  # name → version
        self.fresh_from: dict = {}  # name → the oldest file generation its current content may have
        self.held: list = []  # (hold, {name: tag of the content it acquired}) not released
        self.pinned: dict = {}  # name → slot when pinned

    def teardown(self) -> None:
        for hold, _ in self.held:
            self.cache.release(hold)
        for name in self.cache.names():
            self.cache.unregister(name)
        self.cache.sync()
        stats = self.cache.stats()
        assert (stats.gpu_bytes, stats.cpu_bytes, stats.cpu_entries, stats.slots_used) == (0, 0, 0, 0)
        assert self.cache.contents() == (E, E, E) and self.slots.held == [E, E, E]
        self.cache.close()

    def _read_again(self, name: str) -> None:
        """From now on `name` must serve its files as they are now (or newer)."""
        self.fresh_from[name] = self.disk.generation[name]

    @rule(name=st.sampled_from(NAMES), other_files=st.booleans())
    def register(self, name, other_files):
        """Register (again, if it was unloaded: possibly while a batch holds its old content)."""
        if name in self.registered:
            return
        if other_files:
            self.disk.generation[name] += 1
        self.cache.register(source(name))
        self.registered[name] = 1
        self._read_again(name)

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def use_or_hold(self, data):
        names = data.draw(st.lists(st.sampled_from(sorted(self.registered)), min_size=1, max_size=3, unique=True))
        try:
            hold = self.cache.acquire(names)
        except CapacityError:
            return
        assert all(self.cache.content_ids()[hold.slots[n]] == hold.content_ids[n] for n in names)
        if data.draw(st.booleans()):
            self.held.append((hold, {n: self.cache.weights(n).path for n in names}))
        else:
            self.cache.release(hold)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        hold, _ = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.cache.release(hold)

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def pin(self, data):
        name = data.draw(st.sampled_from(sorted(self.registered)))
        try:
            self.pinned[name] = self.cache.pin(name)
        except CapacityError:  # pinning the last free slot, or every slot pinned or in use
            assert len(set(self.pinned) - {name}) >= 2 or self.cache.stats().in_use > 0

    @precondition(lambda self: self.pinned)
    @rule(data=st.data())
    def unpin(self, data):
        name = data.draw(st.sampled_from(sorted(self.pinned)))
        self.cache.unpin(name)
        del self.pinned[name]

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def unload(self, data):
        name = data.draw(st.sampled_from(sorted(self.registered)))
        self.cache.unregister(name)
        del self.registered[name]
        self.pinned.pop(name, None)

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def evict(self, data):
        name = data.draw(st.sampled_from(sorted(self.registered)))
        current = self.cache.describe(name)[3]
        busy = name in self.pinned or any(h.content_ids.get(name) == current for h, _ in self.held if current)
        assert self.cache.evict(name) is not busy
        if not busy:
            assert self.cache.state(name) is S.COLD and self.cache.weights(name) is None
            self._read_again(name)

    @precondition(lambda self: self.registered)
    @rule(data=st.data(), evict=st.booleans())
    def rewrite_files(self, data, evict):
        """A training job publishes new files under the same directory; maybe the operator evicts."""
        name = data.draw(st.sampled_from(sorted(self.registered)))
        self.disk.generation[name] += 1
        if evict and name not in self.pinned and self.cache.evict(name):
            self._read_again(name)

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def replace(self, data):
        name = data.draw(st.sampled_from(sorted(self.registered)))
        self.registered[name] += 1
        new = source(name, self.registered[name])
        self.cache.register(new, weights_for(new, self.disk.generation[name]), replace=True)
        self._read_again(name)

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def reload_same_name_with_other_weights(self, data):
        """Unload and load again under the same name with other weights (their own version 1)."""
        name = data.draw(st.sampled_from(sorted(self.registered)))
        self.cache.unregister(name)
        self.pinned.pop(name, None)
        self.disk.generation[name] += 1
        new = source(name)
        self.cache.register(new, weights_for(new, self.disk.generation[name]))
        self.registered[name] = 1
        self._read_again(name)

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def prefetch(self, data):
        names = data.draw(st.lists(st.sampled_from(sorted(self.registered)), min_size=1, max_size=2, unique=True))
        for future in self.cache.prefetch(names).values():
            future.result()

    @invariant()
    def slots_hold_what_they_claim(self):
        self.cache.sync()  # as every forward does first
        ids = self.cache.content_ids()
        for slot, name in enumerate(self.cache.contents()):
            assert (name is E) == (self.slots.held[slot] is E) == (ids[slot] is E)
        for hold, tags in self.held:  # a batch keeps the content it acquired, whatever happened since
            for name, tag in tags.items():
                assert ids[hold.slots[name]] == hold.content_ids[name]
                assert self.slots.held[hold.slots[name]] == tag, (name, tag)
        for name, version in self.registered.items():
            weights = self.cache.weights(name)
            if weights is None:
                continue
            tag = weights.path  # its latest version, from files never older than those last published or read
            generation = int(tag.partition("+")[2] or 0)
            assert tag.partition("+")[0] == f"{name}@v{version}" and generation >= self.fresh_from[name], (name, tag)
            slot = self.cache.content_ids().index(self.cache.describe(name)[3]) \
                if self.cache.state(name) is S.ACTIVE else None
            if slot is not None:
                assert self.slots.held[slot] == tag, (name, tag, self.slots.held[slot])

    @invariant()
    def bounded_and_consistent(self):
        contents, cpu = self.cache.contents(), self.cache.cpu_names()
        ids = [c for c in self.cache.content_ids() if c is not E]
        assert len(ids) == len(set(ids)) <= 3
        current = {n: self.cache.describe(n)[3] for n in self.registered}
        older = {(n, c) for h, _ in self.held for n, c in h.content_ids.items() if current.get(n) != c}
        # the bound holds, except for older contents that running batches still hold
        assert len(set(cpu)) == len(cpu) and self.cache.stats().cpu_entries <= 4 + len(older)
        assert {n for n in contents if n is not E} <= set(cpu)
        for name in self.pinned:  # pinned: in a slot, unless a batch holds it over a replace
            assert current[name] in ids or any(n == name for n, _ in older), name
        for hold, _ in self.held:  # in use: in a slot
            assert all(contents[s] == n for n, s in hold.slots.items())
        for name in self.registered:
            state = self.cache.state(name)
            want = S.ACTIVE if current[name] in ids else S.CPU if current[name] is not None else S.COLD
            assert state is want, (name, state, want)
        for name in {n for n, _ in older} - set(self.registered):
            assert self.cache.state(name) is S.EVICTING
        assert sorted(self.cache.names()) == sorted(self.registered)


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None, derandomize=True)
test_cache_state_machine = CacheMachine.TestCase
