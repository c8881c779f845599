"""SlotTable: explicit slot contents after each operation; adapter load/unload cycles."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from multilora_plugin import EMPTY, CapacityError
from multilora_plugin.adapters import SlotTable

from .conftest import padded_batch

E = EMPTY
# each step: (names acquired together, or ("release", name)) → slot contents after it
SCENARIOS = {
    "empty table": (3, []),
    "fill free slots in order": (3, [(["a"], ("a", E, E)), (["b", "c"], ("a", "b", "c"))]),
    "evict least recently used": (2, [(["a"], ("a", E)), (["b"], ("a", "b")), (["a"], ("a", "b")),
                                      (["c"], ("a", "c"))]),
    "never evict what the batch needs": (2, [(["a", "b"], ("a", "b")), (["b", "c"], ("c", "b"))]),
    "release frees the slot": (2, [(["a", "b"], ("a", "b")), (("release", "a"), (E, "b")),
                                   (["c"], ("c", "b"))]),
    "duplicates count once": (1, [(["a", "a", "a"], ("a",))]),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_slot_table_scenarios(scenario):
    num_slots, steps = SCENARIOS[scenario]
    table = SlotTable(num_slots)
    assert table.contents() == (E,) * num_slots
    for op, expected in steps:
        if op[0] == "release":
            table.release(op[1])
        else:
            slots, _ = table.acquire(op)
            assert all(table.contents()[slots[n]] == n for n in op)
        assert table.contents() == expected


def test_acquire_reports_only_newly_placed_adapters():
    table = SlotTable(3)
    assert table.acquire(["a", "b"])[1] == [(0, "a"), (1, "b")]
    assert table.acquire(["b", "c"])[1] == [(2, "c")]


def test_capacity_error_changes_nothing():
    table = SlotTable(2)
    table.acquire(["a"])
    with pytest.raises(CapacityError, match="needs 3 distinct adapters at once, but there are only 2 slots"):
        table.acquire(["x", "y", "z"])
    assert table.contents() == ("a", E)


def test_load_unload_cycles_leave_nothing_behind(llama_kit):
    model = llama_kit.wrapped(max_loras=2)
    ids, _ = padded_batch(2, [4, 4])
    with torch.no_grad():
        reference = model(ids, adapter_names=["all4", "attn8_rs"]).logits
    for _ in range(3):
        weights = model._adapters["all4"]
        ref = weakref.ref(next(iter(weights.modules.values())).a)
        del weights
        model.unload_adapter("all4")
        gc.collect()
        assert ref() is None, "the unloaded adapter's CPU weights are still referenced"
        assert "all4" not in model.adapters and "all4" not in model.slot_contents()
        for layer in model._layers.values():  # the freed slot holds nothing
            slot = model.slot_contents().index(E)
            assert layer.lora_ranks[slot] == 0 and not layer.lora_a[slot].any() and not layer.lora_b[slot].any()
        model.load_adapter("all4", llama_kit.paths["all4"])
        with torch.no_grad():
            again = model(ids, adapter_names=["all4", "attn8_rs"]).logits
        torch.testing.assert_close(again, reference, atol=1e-6, rtol=0)
    for name in list(model.adapters):
        model.unload_adapter(name)
    assert model.adapters == {} and model.slot_contents() == (E, E)
