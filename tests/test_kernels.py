"""Kernel backends against the pure-torch reference: dtype × rank × size × batch × adapter popularity.

The Triton backend runs on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py when there is no GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from multilora_plugin import BatchMapping
from multilora_plugin.kernels import (SlotBank, TorchBackend, add_lora_reference, lora_expand_reference,
                                      lora_shrink_reference, torch_ops)

from .conftest import kernel_backends

NUM_SLOTS, MAX_RANK = 4, 64
RANKS = (1, 8, 16, 64)  # one slot each: mixed ranks in one batch
BACKENDS = kernel_backends()


def popularity(pattern: str, rows: int, gen: torch.Generator) -> tuple:
    if pattern == "distinct":
        return tuple(i % NUM_SLOTS for i in range(rows))
    if pattern == "uniform":
        return tuple(torch.randint(0, NUM_SLOTS, (rows,), generator=gen).tolist())
    if pattern == "skewed":  # most rows on slot 0
        return tuple(0 if torch.rand((), generator=gen) < 0.8 else 1 + i % (NUM_SLOTS - 1) for i in range(rows))
    if pattern == "identical":
        return (2,) * rows
    if pattern == "with_base":  # a fifth of the rows on the base model (-1 among five slot values)
        return tuple(torch.randint(-1, NUM_SLOTS, (rows,), generator=gen).tolist())
    raise ValueError(pattern)


@dataclass
class Case:
    row_slots: tuple
    per_row: int
    x: torch.Tensor  # [T, in]
    y: torch.Tensor  # [T, out]
    lora_a: torch.Tensor  # [S, R, in]
    lora_b: torch.Tensor  # [S, out, R]
    lora_ranks: torch.Tensor  # [S]

    @property
    def token_slots(self) -> torch.Tensor:
        return torch.tensor(self.row_slots).repeat_interleave(self.per_row)

    @property
    def tokens(self):
        return BatchMapping(self.row_slots, NUM_SLOTS).tokens(self.x.shape[0], self.x.device)

    def base_rows(self):
        return [i for i, s in enumerate(self.token_slots.tolist()) if s < 0]

    @property
    def bank(self) -> SlotBank:
        """The same pairs packed at their own ranks (nothing padded), as the slot memory holds them."""
        return SlotBank.from_padded(self.lora_a, self.lora_b, self.lora_ranks)


def make_case(rows, per_row, d_in, d_out, dtype, pattern, ranks=RANKS, seed=0) -> Case:
    """Slot buffers filled to each slot's rank with zeros after it, as `MultiLoRALinear` keeps them."""
    gen = torch.Generator().manual_seed(seed)
    row_slots = popularity(pattern, rows, gen)
    a = torch.zeros(NUM_SLOTS, MAX_RANK, d_in, dtype=dtype)
    b = torch.zeros(NUM_SLOTS, d_out, MAX_RANK, dtype=dtype)
    for s, r in enumerate(ranks):
        a[s, :r] = (torch.randn(r, d_in, generator=gen) / d_in ** 0.5).to(dtype)
        b[s, :, :r] = (torch.randn(d_out, r, generator=gen) / r ** 0.5).to(dtype)
    x = torch.randn(rows * per_row, d_in, generator=gen).to(dtype)
    y = torch.randn(rows * per_row, d_out, generator=gen).to(dtype)
    return Case(row_slots, per_row, x, y, a, b, torch.tensor(ranks, dtype=torch.int32))


TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}
PATTERNS = ["distinct", "uniform", "skewed", "identical", "with_base"]


def check_add_lora(backend, case: Case, dtype) -> None:
    want = case.y.clone()
    add_lora_reference(want, case.x, case.lora_a, case.lora_b, case.lora_ranks, case.token_slots)
    got = case.y.clone()
    backend.add_lora(got, case.x, case.bank, case.tokens)
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    base = case.base_rows()
    assert torch.equal(got[base], case.y[base])  # base rows are left bit-identical


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("rows", [1, 7, 33, 64])
def test_add_lora_decode(backend, dtype, pattern, rows):
    check_add_lora(backend, make_case(rows, 1, 64, 96, dtype, pattern), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("rows,per_row", [(1, 9), (7, 5), (3, 33)])
def test_add_lora_prefill(backend, dtype, pattern, rows, per_row):
    check_add_lora(backend, make_case(rows, per_row, 64, 96, dtype, pattern), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_in,d_out", [(33, 17), (17, 130), (200, 3)])
@pytest.mark.parametrize("rows,per_row", [(7, 1), (5, 3)])
def test_add_lora_odd_sizes(backend, d_in, d_out, rows, per_row):
    check_add_lora(backend, make_case(rows, per_row, d_in, d_out, torch.float32, "with_base", seed=1), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("rows,per_row", [(7, 1), (5, 4)])
def test_shrink_then_expand(backend, pattern, rows, per_row):
    case = make_case(rows, per_row, 48, 80, torch.float32, pattern, seed=2)
    bank = case.bank
    h = backend.lora_shrink(case.x, bank, case.tokens)
    want_h = lora_shrink_reference(case.x, case.lora_a, case.lora_ranks, case.token_slots)
    rank = bank.max_rank(s for s, _, _ in case.tokens.segments)  # the batch's largest rank: h is no wider
    assert h.dtype == torch.float32 and h.shape == (case.x.shape[0], rank)
    torch.testing.assert_close(h, want_h[:, :rank], atol=1e-4, rtol=1e-4)
    assert not want_h[:, rank:].any()
    got, want = case.y.clone(), case.y.clone()
    backend.lora_expand(got, want_h[:, :rank], bank, case.tokens)
    lora_expand_reference(want, want_h, case.lora_b, case.lora_ranks, case.token_slots)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[case.base_rows()], case.y[case.base_rows()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_row", [1, 6])
def test_a_batch_of_only_base_rows_leaves_y_bit_identical(backend, per_row):
    case = make_case(6, per_row, 32, 32, torch.float32, "identical")
    case.row_slots = (-1,) * 6
    y = case.y.clone()
    backend.add_lora(y, case.x, case.bank, case.tokens)
    assert torch.equal(y, case.y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_each_slots_own_rank_rows_are_read(backend):
    """Each slot's pair is read up to its own rank: whatever lies around it in the storage (other
    adapters, free memory) never changes the result, and a slot of rank 0 is never read."""
    case = make_case(9, 2, 64, 64, torch.float32, "uniform", ranks=(2, 8, 5, 0), seed=3)
    want = case.y.clone()
    add_lora_reference(want, case.x, case.lora_a, case.lora_b, case.lora_ranks, case.token_slots)
    d, ranks = 64, case.lora_ranks.tolist()
    storage = torch.full((3 * sum(ranks) * 2 * d,), float("nan"))  # NaN between and around the pairs
    bank, start = SlotBank(NUM_SLOTS, d, d, storage.device, storage.dtype), 7
    for slot, r in enumerate(ranks):
        a = storage[start:start + r * d].view(r, d)
        b = storage[start + 2 * r * d + 3:start + 3 * r * d + 3].view(r, d)
        a.copy_(case.lora_a[slot, :r])
        b.copy_(case.lora_b[slot, :, :r].T)
        bank.bind(slot, a, b)
        start += 3 * r * d + 11
    got = case.y.clone()
    backend.add_lora(got, case.x, bank, case.tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("segment_us", [-1e9, 1e9])
def test_torch_backend_every_shape_of_work(monkeypatch, segment_us):
    """Segments (a segment costs nothing) and stacked (a segment costs everything) both give the
    reference's result, for every pattern."""
    monkeypatch.setattr(torch_ops, "SEGMENT_US", segment_us)
    for pattern in PATTERNS:
        for rows, per_row in [(16, 1), (5, 3)]:
            check_add_lora(TorchBackend(), make_case(rows, per_row, 64, 96, torch.float32, pattern), torch.float32)


def test_the_stacked_pairs_are_kept_from_step_to_step_and_only_what_joins_is_copied():
    """Decode steps whose adapters change a few at a time: each gives the reference's result, the stack
    copies only the pairs it lacks, and a slot written again is never served from its old block."""
    case = make_case(8, 1, 64, 96, torch.float32, "distinct", ranks=(8, 8, 8, 8), seed=6)
    bank = case.bank

    def step(row_slots):
        case.row_slots = row_slots
        want, got = case.y.clone(), case.y.clone()
        add_lora_reference(want, case.x, case.lora_a, case.lora_b, case.lora_ranks, case.token_slots)
        TorchBackend._add_stacked(got, case.x, bank, case.tokens, list(case.tokens.segments))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    step((0, 1, 0, 1, -1, 0, 1, 1))
    first = bank.stack.a
    assert bank.copy_bytes((1, 2)) == 8 * (64 + 96) * 4  # only slot 2 lacks a block
    step((2, 1, 2, 1, 1, -1, 2, 2))  # slot 2 takes the block of slot 0, which left the batch
    assert bank.stack.a is first and sorted(bank.stack.owners) == [1, 2]
    case.lora_a[1] *= -1  # slot 1 is written again: its block is stale
    fresh = SlotBank.from_padded(case.lora_a, case.lora_b, case.lora_ranks)
    bank.bind(1, fresh.a[1], fresh.b[1])
    assert 1 not in bank.stack.owners
    step((2, 1, 3, 1, 3, 1, 2, -1))
    step((3, 3, 3, 3, 0, 0, 0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row_slots", [
    (0, 1, 2, 3),  # one token per slot, in order
    (3, 1, 2, 0),  # contiguous but permuted
    (2, -1, 1, 3),  # contiguous range 1..3 with a base row
    (1, 3),  # not contiguous: weights gathered
    (3, 3, -1, 0),
])
def test_add_lora_explicit_decode_layouts(backend, row_slots):
    case = make_case(len(row_slots), 1, 40, 24, torch.float32, "identical", seed=5)
    case.row_slots = row_slots
    check_add_lora(backend, case, torch.float32)


@pytest.mark.parametrize("rows,per_row,d,pattern,shape", [
    (4, 1, 4096, "distinct", "segments"),  # one token per adapter, large weights: a copy of them costs more
    (16, 1, 512, "distinct", "stacked"),  # decode over 4 adapters: two matmuls beat a loop over 4 segments
    (16, 1, 512, "identical", "segments"),  # one segment
    (64, 1, 4096, "uniform", "segments"),  # adapters shared by many tokens, large weights: 4x the arithmetic loses
    (8, 32, 512, "distinct", "segments"),  # prefill: 32 tokens for each of 4 adapters
])
def test_torch_backend_chooses_the_cheaper_shape_of_work(rows, per_row, d, pattern, shape):
    gen = torch.Generator().manual_seed(0)
    tokens = BatchMapping(popularity(pattern, rows, gen), NUM_SLOTS).tokens(rows * per_row, torch.device("cpu"))
    bank = SlotBank.from_padded(torch.zeros(NUM_SLOTS, 16, d), torch.zeros(NUM_SLOTS, d, 16),
                                torch.full((NUM_SLOTS,), 16, dtype=torch.int32))
    assert torch_ops._plan(tokens, list(tokens.segments), bank) == shape
