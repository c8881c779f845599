"""SlotTable: explicit slot contents after each operation."""

from __future__ import annotations

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from multilora_plugin import EMPTY, AdapterTooLargeError, CapacityError
from multilora_plugin.adapters import SlotTable

E = EMPTY
# each step: (names placed together, or ("release", name)) → slot contents after it.
# Names in PROTECTED (pinned or in use) are never evicted.
PROTECTED = {"p"}
SCENARIOS = {
    "empty table": (3, []),
    "fill free slots in order": (3, [(["a"], ("a", E, E)), (["b", "c"], ("a", "b", "c"))]),
    "evict least recently used": (2, [(["a"], ("a", E)), (["b"], ("a", "b")), (["a"], ("a", "b")),
                                      (["c"], ("a", "c"))]),
    "never evict what the batch needs": (2, [(["a", "b"], ("a", "b")), (["b", "c"], ("c", "b"))]),
    "release frees the slot": (2, [(["a", "b"], ("a", "b")), (("release", "a"), (E, "b")),
                                   (["c"], ("c", "b"))]),
    "a freed slot is taken before any eviction": (3, [(["a", "b", "c"], ("a", "b", "c")),
                                                      (("release", "b"), ("a", E, "c")), (["d"], ("a", "d", "c"))]),
    "duplicates count once": (1, [(["a", "a", "a"], ("a",))]),
    "protected is skipped even when least recent": (2, [(["p"], ("p", E)), (["a"], ("p", "a")),
                                                        (["b"], ("p", "b")), (["c"], ("p", "c"))]),
    "protected can be used again": (2, [(["p", "a"], ("p", "a")), (["p"], ("p", "a")), (["b"], ("p", "b"))]),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_slot_table_scenarios(scenario):
    num_slots, steps = SCENARIOS[scenario]
    table = SlotTable(num_slots)
    assert table.contents() == (E,) * num_slots and len(table) == 0
    for op, expected in steps:
        if op[0] == "release":
            table.release(op[1])
        else:
            slots, _, _ = table.acquire(op, PROTECTED.__contains__)
            assert all(table.contents()[slots[n]] == n for n in op)
        assert table.contents() == expected
        assert len(table) == sum(c is not E for c in expected)


def test_acquire_reports_placements_and_evictions():
    table = SlotTable(2)
    assert table.acquire(["a", "b"])[1:] == ([(0, "a"), (1, "b")], [])
    assert table.acquire(["b", "c"])[1:] == ([(0, "c")], [(0, "a")])
    assert table.acquire(["c"])[1:] == ([], [])


def test_capacity_error_changes_nothing():
    table = SlotTable(2)
    table.acquire(["a"])
    with pytest.raises(CapacityError, match="needs 3 distinct adapters at once, but there are only 2 slots"):
        table.acquire(["x", "y", "z"])
    assert table.contents() == ("a", E)


def test_capacity_error_names_the_protected_adapters():
    table = SlotTable(2)
    table.acquire(["p", "q"])
    with pytest.raises(CapacityError, match=r"but 2 of the 2 slots are taken by \['p', 'q'\], pinned or in use"):
        table.acquire(["x"], {"p", "q"}.__contains__)
    assert table.contents() == ("p", "q")
    assert table.acquire(["x"], {"p"}.__contains__)[1:] == ([(1, "x")], [(1, "q")])


def test_release_of_a_name_without_a_slot_is_a_no_op():
    table = SlotTable(1)
    assert table.release("ghost") is None
    assert table.contents() == (E,)


SIZES = {"a": 4, "b": 4, "c": 8, "d": 2, "big": 20}


def test_bytes_evict_only_as_many_as_needed_least_recent_first():
    table = SlotTable(8, capacity=12, size=SIZES.__getitem__)
    table.acquire(["a"])
    table.acquire(["b"])
    assert table.used_bytes == 8
    assert table.acquire(["c"])[1:] == ([(0, "c")], [(0, "a")])  # 4 + 8 fits once a is gone; b stays
    assert table.contents()[:2] == ("c", "b") and table.used_bytes == 12
    table.acquire(["d"])  # 14 > 12: b, the least recent, goes
    assert set(table.resident()) == {"c", "d"} and table.used_bytes == 10


def test_bytes_and_slots_bound_together():
    table = SlotTable(2, capacity=100, size=SIZES.__getitem__)
    table.acquire(["d", "a"])
    assert table.acquire(["b"])[2] == [(0, "d")]  # bytes are plenty; the slot count is not


def test_an_adapter_larger_than_the_budget_is_refused_naming_both_sizes():
    table = SlotTable(4, capacity=16, size=SIZES.__getitem__)
    table.acquire(["a"])
    with pytest.raises(AdapterTooLargeError, match=r"'big' needs 20 B of slot memory, .* budget of 16 B"):
        table.acquire(["big"])
    with pytest.raises(CapacityError, match="4 adapters of 18 B together in slot memory, but the budget is 16 B"):
        table.acquire(["a", "b", "c", "d"])
    assert table.resident() == ["a"]


def test_what_the_protected_keys_hold_is_kept():
    table = SlotTable(8, capacity=12, size=SIZES.__getitem__)
    table.acquire(["c", "a"])
    with pytest.raises(CapacityError, match=r"taken by \['a', 'c'\]"):
        table.acquire(["b"], {"c", "a"}.__contains__)
    assert table.fits(["b"], kept=["c"]) is True and table.fits(["b", "d"], kept=["c"]) is False
    assert table.fits([], kept=["c"], sizes=[4]) is True and table.fits([], kept=["c"], sizes=[6]) is False


def test_a_swap_that_grows_past_the_budget_is_refused():
    table = SlotTable(4, capacity=10, size=SIZES.__getitem__)
    table.acquire(["a", "b"])
    assert table.swap("a", "c", growth=8 - 4) is None and table.resident() == ["a", "b"]
    assert table.swap("a", "d", growth=2 - 4) == 0 and table.contents()[0] == "d"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.lists(st.sampled_from("abcdp"), min_size=1, max_size=3),
                          st.tuples(st.just("release"), st.sampled_from("abcdp"))), max_size=30),
       st.integers(8, 24), st.integers(1, 4))
def test_the_bounds_always_hold(steps, capacity, num_slots):
    """Whatever is asked, the resident keys fit both bounds, a protected key is never evicted, and a
    refused placement changes nothing."""
    sizes = {"a": 4, "b": 4, "c": 8, "d": 2, "p": 6}
    table = SlotTable(num_slots, capacity=capacity, size=sizes.__getitem__)
    for op in steps:
        before = table.resident()
        if isinstance(op, tuple):
            table.release(op[1])
            continue
        try:
            _, _, evicted = table.acquire(op, "p".__eq__)
        except CapacityError:
            assert table.resident() == before
            continue
        assert "p" not in {key for _, key in evicted}
        assert set(op) <= set(table.resident())
        assert table.used_bytes <= capacity and len(table) <= num_slots
