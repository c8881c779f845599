"""BatchMapping: row → slot, sorted segments and per-token index, against explicit tables."""

from __future__ import annotations

import pytest
import torch

from multilora_plugin import BatchMapping, InvalidRequestError
from multilora_plugin.mapping import PackedMapping, expand_rows, grouped_token_mapping, token_mapping

# row_slots, num_slots → order, segments
TABLE = [
    ((), 4, (), ()),
    ((-1, -1), 4, (), ()),
    ((0,), 4, (0,), ((0, 0, 1),)),
    ((2, -1, 0), 4, (2, 0), ((0, 0, 1), (2, 1, 2))),
    ((3, 3, 3), 4, (0, 1, 2), ((3, 0, 3),)),
    ((1, 0, 1, -1, 0), 2, (1, 4, 0, 2), ((0, 0, 2), (1, 2, 4))),
]


@pytest.mark.parametrize("row_slots,num_slots,order,segments", TABLE)
def test_rows_are_grouped_by_slot(row_slots, num_slots, order, segments):
    mapping = BatchMapping(row_slots, num_slots)
    assert mapping.order == order
    assert mapping.segments == segments
    assert mapping.has_lora == bool(order)


def test_token_mapping_of_the_running_example():
    tokens = BatchMapping((2, -1, 0), 4).tokens(6, torch.device("cpu"))
    assert tokens.index.tolist() == [4, 5, 0, 1]
    assert tokens.active_slots.tolist() == [0, 0, 2, 2]
    assert tokens.token_slots.tolist() == [2, 2, -1, -1, 0, 0]
    assert tokens.segments == ((0, 0, 2), (2, 2, 4))
    assert (tokens.seg_slots.tolist(), tokens.seg_starts.tolist(), tokens.seg_lens.tolist()) == ([0, 2], [0, 2], [2, 2])
    assert all(t.dtype == torch.int32 for t in (tokens.index, tokens.token_slots, tokens.seg_lens))
    assert (tokens.num_active, tokens.all_active, tokens.max_segment_len, tokens.kind) == (4, False, 2, "sgmv")
    assert not tokens.identity


def test_token_mapping_of_an_all_base_batch():
    tokens = BatchMapping((-1, -1), 3).tokens(2, torch.device("cpu"))
    assert tokens.segments == () and tokens.num_active == 0 and tokens.index.numel() == 0
    assert tokens.token_slots.tolist() == [-1, -1]


@pytest.mark.parametrize("row_slots,identity", [((0, 1, 1), True), ((1, 0), False), ((0, -1), False)])
def test_identity_when_every_row_is_already_in_order(row_slots, identity):
    assert BatchMapping(row_slots, 2).tokens(len(row_slots) * 3, torch.device("cpu")).identity is identity


def test_token_mappings_are_cached_per_size():
    mapping = BatchMapping((1, 0), 2)
    cpu = torch.device("cpu")
    assert mapping.tokens(4, cpu) is mapping.tokens(4, cpu)
    assert mapping.tokens(2, cpu) is not mapping.tokens(4, cpu)


def test_bad_inputs():
    with pytest.raises(InvalidRequestError, match="slot ids should be in -1..1"):
        BatchMapping((0, 2), 2)
    with pytest.raises(InvalidRequestError, match="5 tokens cannot be split into 2 rows"):
        BatchMapping((0, 1), 2).tokens(5, torch.device("cpu"))


@pytest.mark.parametrize("rows,batch,expected", [
    ((0, -1), 2, (0, -1)),
    ((0, -1), 6, (0, 0, 0, -1, -1, -1)),
    ((1,), 3, (1, 1, 1)),
])
def test_expand_rows_follows_repeat_interleave(rows, batch, expected):
    assert expand_rows(rows, batch) == expected


def test_expand_rows_refuses_uneven_batches():
    with pytest.raises(InvalidRequestError, match="5 rows cannot be mapped onto 2 adapter names"):
        expand_rows((0, 1), 5)


# request_slots, query_lens, num_tokens → token_slots, index, segments, kind
PACKED = [
    ((1, -1, 0), (3, 2, 1), 7, [1, 1, 1, -1, -1, 0, -1], [5, 0, 1, 2], ((0, 0, 1), (1, 1, 4)), "sgmv"),
    ((0, 0, -1), (1, 1, 1), 3, [0, 0, -1], [0, 1], ((0, 0, 2),), "bgmv"),
    ((1, 0), (1, 1), 4, [1, 0, -1, -1], [1, 0], ((0, 0, 1), (1, 1, 2)), "bgmv"),  # two padding tokens
    ((-1,), (4,), 4, [-1] * 4, [], (), "sgmv"),
    ((), (), 2, [-1, -1], [], (), "bgmv"),
]


@pytest.mark.parametrize("slots,lens,num_tokens,token_slots,index,segments,kind", PACKED)
def test_packed_requests_map_each_token_to_its_request(slots, lens, num_tokens, token_slots, index, segments, kind):
    mapping = PackedMapping(slots, lens, 2)
    tokens = mapping.tokens(num_tokens, torch.device("cpu"))
    assert tokens.token_slots.tolist() == token_slots and tokens.index.tolist() == index
    assert tokens.segments == segments and tokens.kind == kind
    assert mapping.has_lora == bool(index) and mapping.num_rows == 1


def test_packed_mapping_refuses_what_does_not_fit():
    with pytest.raises(InvalidRequestError, match="one query length per request"):
        PackedMapping((0, 1), (3,), 2)
    with pytest.raises(InvalidRequestError, match="slot ids should be in -1..1"):
        PackedMapping((2,), (1,), 2)
    with pytest.raises(InvalidRequestError, match="cannot hold the 5 query tokens"):
        PackedMapping((0, 1), (3, 2), 2).tokens(4, torch.device("cpu"))


# token slots on the device (a MoE layer's routed pairs) → index, segments, kind, identity
GROUPED = [
    ([], [], (), "bgmv", True),
    ([-1, -1], [], (), "bgmv", False),
    ([4, -1, 6, -1], [0, 2], ((4, 0, 1), (6, 1, 2)), "bgmv", False),  # the running example of experts.py
    ([3, 1, 3, 1, -1, 0], [5, 1, 3, 0, 2], ((0, 0, 1), (1, 1, 3), (3, 3, 5)), "sgmv", False),
    ([0, 0, 1], [0, 1, 2], ((0, 0, 2), (1, 2, 3)), "sgmv", True),
]


@pytest.mark.parametrize("token_slots,index,segments,kind,identity", GROUPED)
def test_grouped_token_mapping(token_slots, index, segments, kind, identity):
    tokens = grouped_token_mapping(torch.tensor(token_slots, dtype=torch.long))
    assert tokens.index.tolist() == index
    assert tokens.segments == segments
    assert (tokens.kind, tokens.identity, tokens.num_tokens) == (kind, identity, len(token_slots))
    assert tokens.token_slots.tolist() == token_slots
    assert tokens.active_slots.tolist() == [token_slots[i] for i in index]
    assert tokens.seg_lens.tolist() == [end - start for _, start, end in segments]
    assert all(t.dtype == torch.int32 for t in (tokens.index, tokens.token_slots, tokens.seg_slots))
    # the same table as the host-built mapping of the same runs
    if token_slots:
        host = token_mapping([(s, 1) for s in token_slots], tokens.kind, torch.device("cpu"))
        assert (host.index.tolist(), host.segments, host.identity) == (index, segments, identity)
