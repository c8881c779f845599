"""Which slot serves each row of a forward call: built once per call, shared by every patched layer.

Running example (used in the comments below), `num_slots = 4`, three rows, two tokens per row:

    row_slots  = (2, -1, 0)              # row 1 is a base-model row: it takes no slot
    order      = (2, 0)                  # rows with an adapter, stably sorted by slot
    segments   = ((0, 0, 1), (2, 1, 2))  # (slot, start, end) into `order`

    tokens(6):                           # the same, per token, for a [3 * 2, hidden] activation
      index       = [4, 5, 0, 1]         # tokens that have an adapter, grouped by slot
      token_slots = [0, 0, -1, -1, 2, 2] # every token's slot, in token order
      segments    = ((0, 0, 2), (2, 2, 4))
      seg_slots = [0, 2], seg_starts = [0, 2], seg_lens = [2, 2]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .errors import InvalidRequestError

Segment = tuple  # (slot, start, end): python ints


@dataclass(frozen=True)
class TokenMapping:
    """The mapping per token for one activation size and device: everything a kernel reads.

    Python-side fields drive CPU loops and launch grids; the tensors live on the activation's device
    (one host-to-device copy per forward call, shared by every layer).
    """

    num_tokens: int  # T
    kind: str  # "bgmv": one token per row or request (a decode step); "sgmv": longer runs (prefill, mixed)
    segments: tuple  # ((slot, start, end), ...) into `index`, only slots that have tokens
    identity: bool  # index == arange(T): every token has an adapter and is already in order
    index: torch.Tensor  # [Ta] int32: tokens that have an adapter, grouped by slot (ascending)
    active_slots: torch.Tensor  # [Ta] int32: the slot of each token in `index`
    token_slots: torch.Tensor  # [T] int32: every token's slot in token order, -1 = base model
    seg_slots: torch.Tensor  # [G] int32: slot of each segment
    seg_starts: torch.Tensor  # [G] int32: first position of each segment in `index`
    seg_lens: torch.Tensor  # [G] int32: tokens in each segment
    _masks: dict = field(default_factory=dict, compare=False, repr=False)  # rank_mask's, by its arguments

    def rank_mask(self, slot_ranks: tuple, dtype: torch.dtype) -> torch.Tensor:
        """[T, Σr] of 1 where token t belongs to the slot that owns the column, for `slot_ranks`
        ((slot, r), ...): r columns per slot, in that order; built once per forward, shared by every
        layer whose batch ranks are the same."""
        key = ("ranks", slot_ranks, dtype)
        mask = self._masks.get(key)
        if mask is None:
            device = self.token_slots.device
            owners = torch.tensor([s for s, r in slot_ranks for _ in range(r)], device=device, dtype=torch.int32)
            mask = self._masks[key] = (self.token_slots.unsqueeze(1) == owners).to(dtype)  # [T, Σr]
        return mask

    @property
    def num_active(self) -> int:
        """Tokens that have an adapter (Ta)."""
        return self.segments[-1][2] if self.segments else 0

    @property
    def all_active(self) -> bool:
        return self.num_active == self.num_tokens

    @property
    def max_segment_len(self) -> int:
        return max((end - start for _, start, end in self.segments), default=0)


@dataclass(frozen=True)
class BatchMapping:
    """Row → slot for one forward call (slot -1 = base model, no adapter)."""

    row_slots: tuple  # [B] python ints in -1 .. num_slots - 1
    num_slots: int
    order: tuple = field(init=False)  # rows with an adapter, stably sorted by slot
    segments: tuple = field(init=False)  # ((slot, start, end), ...) into `order`
    _by_tokens: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        bad = [s for s in self.row_slots if not -1 <= s < self.num_slots]
        if bad:
            raise InvalidRequestError(f"slot ids should be in -1..{self.num_slots - 1}, but got {bad}")
        order = tuple(sorted((r for r, s in enumerate(self.row_slots) if s >= 0), key=self.row_slots.__getitem__))
        segments = []
        for pos, row in enumerate(order):
            slot = self.row_slots[row]
            if segments and segments[-1][0] == slot:
                segments[-1][2] = pos + 1
            else:
                segments.append([slot, pos, pos + 1])
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "segments", tuple(tuple(s) for s in segments))

    @property
    def num_rows(self) -> int:
        return len(self.row_slots)

    @property
    def has_lora(self) -> bool:
        return bool(self.order)

    def tokens(self, num_tokens: int, device: torch.device) -> TokenMapping:
        """The per-token mapping of a `[num_tokens, features]` activation, rows first (cached)."""
        key = (num_tokens, device)
        cached = self._by_tokens.get(key)
        if cached is not None:
            return cached
        if num_tokens % self.num_rows:
            raise InvalidRequestError(
                f"an activation of {num_tokens} tokens cannot be split into {self.num_rows} rows of equal length"
            )
        per_row = num_tokens // self.num_rows
        mapping = token_mapping([(slot, per_row) for slot in self.row_slots], "bgmv" if per_row == 1 else "sgmv",
                                device)
        self._by_tokens[key] = mapping
        return mapping

    def head_tokens(self, num_tokens: int, device: torch.device) -> TokenMapping:
        """The per-token mapping of the output embedding's input: the same rows (with as many
        positions each as the model keeps logits for)."""
        return self.tokens(num_tokens, device)


def token_mapping(runs: Sequence[tuple], kind: str, device: torch.device) -> TokenMapping:
    """The `TokenMapping` of an activation whose tokens come in `runs`: ((slot, num_tokens), ...) in
    token order (rows of a padded batch, or the requests of a packed one); tokens are grouped by slot,
    in ascending slot order, keeping their order within a slot."""
    by_slot: dict = {}  # slot → [(first token, count)], in token order
    token_slots: list = []  # [T]
    for slot, count in runs:
        if slot >= 0 and count:
            by_slot.setdefault(slot, []).append((len(token_slots), count))
        token_slots += [slot] * count
    index, active_slots, segments = [], [], []  # [Ta], [Ta], ((slot, start, end), ...) into index
    for slot in sorted(by_slot):
        start = len(index)
        for first, count in by_slot[slot]:
            index.extend(range(first, first + count))
        active_slots += [slot] * (len(index) - start)
        segments.append((slot, start, len(index)))
    seg_slots = [slot for slot, _, _ in segments]
    seg_starts = [start for _, start, _ in segments]
    seg_lens = [end - start for _, start, end in segments]
    # one host-to-device copy for all of them
    packed = torch.tensor(index + active_slots + token_slots + seg_slots + seg_starts + seg_lens,
                          dtype=torch.int32).to(device)
    sizes = (len(index), len(active_slots), len(token_slots), len(segments), len(segments), len(segments))
    parts = torch.split(packed, sizes)
    return TokenMapping(
        num_tokens=len(token_slots),
        kind=kind,
        segments=tuple(segments),
        identity=len(index) == len(token_slots) and all(i == t for t, i in enumerate(index)),
        index=parts[0],
        active_slots=parts[1],
        token_slots=parts[2],
        seg_slots=parts[3],
        seg_starts=parts[4],
        seg_lens=parts[5],
    )


def grouped_token_mapping(token_slots: torch.Tensor) -> TokenMapping:
    """The `TokenMapping` of tokens whose slots are already on the device (`token_slots` [T], -1 =
    none), as a MoE layer's routed (token, expert) pairs are: tokens grouped by slot, ascending,
    keeping their order within a slot. One host sync (the segment table)."""
    token_slots = token_slots.to(torch.int64)
    active = torch.nonzero(token_slots >= 0).squeeze(1)  # [Ta]
    index = active[torch.argsort(token_slots[active], stable=True)]  # [Ta], grouped by slot
    active_slots = token_slots[index]
    seg_slots, seg_lens = torch.unique_consecutive(active_slots, return_counts=True)  # [G], [G]
    seg_starts = torch.cumsum(seg_lens, 0) - seg_lens
    host = torch.stack([seg_slots, seg_starts, seg_lens]).tolist() if len(seg_slots) else [[], [], []]
    segments = tuple((slot, start, start + n) for slot, start, n in zip(*host))
    num_tokens = token_slots.shape[0]
    return TokenMapping(
        num_tokens=num_tokens,
        kind="bgmv" if all(n == 1 for n in host[2]) else "sgmv",
        segments=segments,
        identity=len(index) == num_tokens and bool(torch.equal(index, torch.arange(num_tokens, device=index.device))),
        index=index.to(torch.int32),
        active_slots=active_slots.to(torch.int32),
        token_slots=token_slots.to(torch.int32),
        seg_slots=seg_slots.to(torch.int32),
        seg_starts=seg_starts.to(torch.int32),
        seg_lens=seg_lens.to(torch.int32),
    )


@dataclass(frozen=True)
class PackedMapping:
    """Request → slot for one forward of transformers' continuous batching, which packs every
    request's query tokens into one row: request i owns tokens [cu[i], cu[i + 1]) of the `[1, T]`
    input, where cu is the running sum of `query_lens` (`cu_seq_lens_q`). Tokens past the last
    request (padding) take no slot.

    The model may keep only the last position of the requests that take a new token before its LM
    head (`logits_to_keep`); `head_slots` are then the slots of those rows, in order.

    Running example: request_slots = (1, -1, 0), query_lens = (3, 2, 1), num_slots = 2
        tokens(7): token_slots = [1, 1, 1, -1, -1, 0, -1], index = [5, 0, 1, 2], kind "sgmv"
        with head_slots = (1, 0): head_tokens(3): token_slots = [1, 0, -1]
    """

    request_slots: tuple  # [R] python ints in -1 .. num_slots - 1
    query_lens: tuple  # [R] tokens of each request in this forward
    num_slots: int
    head_slots: Optional[tuple] = None  # the slot of each row the LM head sees; None: every token
    _by_tokens: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.request_slots) != len(self.query_lens):
            raise InvalidRequestError(f"one query length per request was expected, but got {len(self.query_lens)} "
                                      f"for {len(self.request_slots)} requests")
        bad = [s for s in self.request_slots if not -1 <= s < self.num_slots]
        if bad:
            raise InvalidRequestError(f"slot ids should be in -1..{self.num_slots - 1}, but got {bad}")

    @property
    def num_rows(self) -> int:
        return 1  # the packed row

    @property
    def has_lora(self) -> bool:
        return any(s >= 0 and n for s, n in zip(self.request_slots, self.query_lens))

    def tokens(self, num_tokens: int, device: torch.device) -> TokenMapping:
        """The per-token mapping of the packed `[num_tokens, features]` activation (cached)."""
        key = (num_tokens, device)
        cached = self._by_tokens.get(key)
        if cached is not None:
            return cached
        used = sum(self.query_lens)
        if num_tokens < used:
            raise InvalidRequestError(f"an activation of {num_tokens} tokens cannot hold the {used} query tokens "
                                      "of this step's requests")
        runs = list(zip(self.request_slots, self.query_lens)) + [(-1, num_tokens - used)]
        kind = "bgmv" if all(n == 1 for n in self.query_lens) else "sgmv"
        mapping = self._by_tokens[key] = token_mapping(runs, kind, device)
        return mapping

    def head_tokens(self, num_tokens: int, device: torch.device) -> TokenMapping:
        """The per-token mapping of the LM head's input: `head_slots`' rows, then padding (cached)."""
        if self.head_slots is None:
            return self.tokens(num_tokens, device)
        key = ("head", num_tokens, device)
        cached = self._by_tokens.get(key)
        if cached is None:
            if num_tokens < len(self.head_slots):
                raise InvalidRequestError(f"the LM head's input of {num_tokens} rows cannot hold the "
                                          f"{len(self.head_slots)} rows kept for logits")
            runs = [(slot, 1) for slot in self.head_slots] + [(-1, num_tokens - len(self.head_slots))]
            cached = self._by_tokens[key] = token_mapping(runs, "bgmv", device)
        return cached


def expand_rows(row_slots: Sequence[int], batch_size: int) -> tuple:
    """Repeat each row's slot for the rows `generate` expands it into (beams, returned sequences).

    transformers expands a batch with `repeat_interleave`, so row i of the expanded batch of
    `k * B` rows belongs to request `i // k`.
    """
    if batch_size % len(row_slots):
        raise InvalidRequestError(
            f"a batch of {batch_size} rows cannot be mapped onto {len(row_slots)} adapter names "
            "(one name per input row was expected)"
        )
    k = batch_size // len(row_slots)
    return tuple(s for s in row_slots for _ in range(k))


class ForwardContext:
    """What the forward hooks share with every patched layer of one wrapped model."""

    def __init__(self) -> None:
        self.mapping: Optional[BatchMapping] = None  # the mapping of the call in flight
        self.generate_rows: Optional[tuple] = None  # row slots of the `generate` call in flight
        self.held = None  # the cache `Hold` of the forward in flight (called with `adapter_names`)
