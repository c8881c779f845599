"""The torch backend against the pure-torch reference, over dtype × rank × size × adapter popularity."""

from __future__ import annotations

import pytest
import torch

from multilora_plugin import BatchMapping
from multilora_plugin.kernels import TorchBackend, add_lora_reference
from multilora_plugin.kernels import torch_ops

NUM_SLOTS, MAX_RANK = 4, 16


def popularity(pattern: str, rows: int, gen: torch.Generator) -> tuple:
    if pattern == "distinct":
        slots = [i % NUM_SLOTS for i in range(rows)]
    elif pattern == "uniform":
        slots = torch.randint(0, NUM_SLOTS, (rows,), generator=gen).tolist()
    elif pattern == "skewed":  # most rows on slot 0
        slots = [0 if torch.rand((), generator=gen) < 0.8 else 1 + i % (NUM_SLOTS - 1) for i in range(rows)]
    elif pattern == "identical":
        slots = [2] * rows
    elif pattern == "with_base":
        slots = torch.randint(-1, NUM_SLOTS, (rows,), generator=gen).tolist()
    return tuple(slots)


def slot_weights(ranks, d_in, d_out, dtype, gen):
    """Slot buffers with each slot's rank filled and the padding left at zero, as the layer keeps them."""
    a = torch.zeros(NUM_SLOTS, MAX_RANK, d_in, dtype=dtype)
    b = torch.zeros(NUM_SLOTS, d_out, MAX_RANK, dtype=dtype)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, d_in, generator=gen).to(dtype) / d_in ** 0.5
        b[s, :, :r] = torch.randn(d_out, r, generator=gen).to(dtype) / r ** 0.5
    return a, b


def run_both(rows, per_row, d_in, d_out, dtype, pattern, ranks=(1, 8, 16, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    row_slots = popularity(pattern, rows, gen)
    a, b = slot_weights(ranks, d_in, d_out, dtype, gen)
    x = torch.randn(rows * per_row, d_in, generator=gen).to(dtype)  # [T, in]
    y = torch.randn(rows * per_row, d_out, generator=gen).to(dtype)  # [T, out]
    want = y.clone()
    add_lora_reference(want, x, a, b, torch.tensor(row_slots).repeat_interleave(per_row))
    got = y.clone()
    TorchBackend().add_lora(got, x, a, b, BatchMapping(row_slots, NUM_SLOTS).tokens(x.shape[0], x.device))
    return row_slots, y, got, want


TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["distinct", "uniform", "skewed", "identical", "with_base"])
@pytest.mark.parametrize("rows,per_row", [(1, 1), (7, 1), (33, 1), (64, 1), (5, 9)])
@pytest.mark.parametrize("d_in,d_out", [(64, 128), (33, 17)])
def test_torch_backend_matches_reference(dtype, pattern, rows, per_row, d_in, d_out):
    row_slots, y, got, want = run_both(rows, per_row, d_in, d_out, dtype, pattern)
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    for row, slot in enumerate(row_slots):  # base rows are left bit-identical
        if slot < 0:
            assert torch.equal(got[row * per_row:(row + 1) * per_row], y[row * per_row:(row + 1) * per_row])


def test_segment_loop_matches_grouped_gemm(monkeypatch):
    """Both paths of the torch backend give the same result."""
    _, _, grouped, want = run_both(20, 3, 64, 96, torch.float32, "with_base", seed=4)
    monkeypatch.setattr(torch_ops, "_grouped_mm", None)
    _, _, looped, _ = run_both(20, 3, 64, 96, torch.float32, "with_base", seed=4)
    torch.testing.assert_close(grouped, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(looped, want, atol=1e-5, rtol=1e-5)


def test_a_batch_of_only_base_rows_leaves_y_untouched():
    gen = torch.Generator().manual_seed(0)
    a, b = slot_weights((4, 4, 4, 4), 32, 32, torch.float32, gen)
    x, y = torch.randn(6, 32, generator=gen), torch.randn(6, 32, generator=gen)
    before = y.clone()
    TorchBackend().add_lora(y, x, a, b, BatchMapping((-1,) * 6, NUM_SLOTS).tokens(6, x.device))
    assert torch.equal(y, before)
