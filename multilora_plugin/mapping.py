"""Which slot serves each row of a forward call: built once per call, shared by every patched layer.

Running example (used in the comments below), `num_slots = 4`, three rows, two tokens per row:

    row_slots  = (2, -1, 0)              # row 1 is a base-model row: it takes no slot
    order      = (2, 0)                  # rows with an adapter, stably sorted by slot
    segments   = ((0, 0, 1), (2, 1, 2))  # (slot, start, end) into `order`

    tokens(6):                           # the same, per token, for a [3 * 2, hidden] activation
      index    = [4, 5, 0, 1]            # tokens of rows 2 then 0
      offsets  = [2, 2, 4, 4]            # end of each slot's tokens in `index` (cumulative, all slots)
      segments = ((0, 0, 2), (2, 2, 4))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .errors import InvalidRequestError

Segment = tuple  # (slot, start, end): python ints


@dataclass(frozen=True)
class TokenMapping:
    """The mapping per token for one activation size and device. Kernels read only this."""

    index: torch.Tensor  # [Ta] int64: tokens that have an adapter, grouped by slot (ascending)
    offsets: torch.Tensor  # [num_slots] int32: offsets[s] = end of slot s's tokens in `index`
    segments: tuple  # ((slot, start, end), ...) into `index`, only slots that have tokens
    identity: bool  # index == arange(T): every token has an adapter and is already in order

    @property
    def num_tokens(self) -> int:
        return int(self.index.shape[0])


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
        key = (num_tokens, str(device))
        cached = self._by_tokens.get(key)
        if cached is not None:
            return cached
        if num_tokens % self.num_rows:
            raise InvalidRequestError(
                f"an activation of {num_tokens} tokens cannot be split into {self.num_rows} rows of equal length"
            )
        per_row = num_tokens // self.num_rows
        rows = torch.tensor(self.order, dtype=torch.int64)  # [Ba]
        index = (rows[:, None] * per_row + torch.arange(per_row)).reshape(-1)  # [Ba * per_row]
        counts = [0] * self.num_slots
        for slot, start, end in self.segments:
            counts[slot] = (end - start) * per_row
        offsets = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)  # [num_slots]
        segments = tuple((slot, start * per_row, end * per_row) for slot, start, end in self.segments)
        identity = len(self.order) == self.num_rows and self.order == tuple(range(self.num_rows))
        mapping = TokenMapping(index.to(device), offsets.to(device), segments, identity)
        self._by_tokens[key] = mapping
        return mapping


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
