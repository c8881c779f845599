"""SlotTable: explicit slot contents after each operation."""

from __future__ import annotations

import pytest

from multilora_plugin import EMPTY, CapacityError
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
            slots, _ = table.acquire(op, PROTECTED.__contains__)
            assert all(table.contents()[slots[n]] == n for n in op)
        assert table.contents() == expected
        assert len(table) == sum(c is not E for c in expected)


def test_acquire_reports_placements_and_evictions():
    table = SlotTable(2)
    assert table.acquire(["a", "b"])[1] == [(0, "a", E), (1, "b", E)]
    assert table.acquire(["b", "c"])[1] == [(0, "c", "a")]
    assert table.acquire(["c"])[1] == []


def test_capacity_error_changes_nothing():
    table = SlotTable(2)
    table.acquire(["a"])
    with pytest.raises(CapacityError, match="needs 3 distinct adapters at once, but there are only 2 slots"):
        table.acquire(["x", "y", "z"])
    assert table.contents() == ("a", E)


def test_capacity_error_names_the_protected_adapters():
    table = SlotTable(2)
    table.acquire(["p", "q"])
    with pytest.raises(CapacityError, match=r"only 0 of the 2 slots .* \['p', 'q'\] are pinned or in use"):
        table.acquire(["x"], {"p", "q"}.__contains__)
    assert table.contents() == ("p", "q")
    assert table.acquire(["x"], {"p"}.__contains__)[1] == [(1, "x", "q")]


def test_release_of_a_name_without_a_slot_is_a_no_op():
    table = SlotTable(1)
    assert table.release("ghost") is None
    assert table.contents() == (E,)
