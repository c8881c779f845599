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
    tokens_per_row: int  # 1 for decode steps
    segments: tuple  # ((slot, start, end), ...) into `index`, only slots that have tokens
    identity: bool  # index == arange(T): every token has an adapter and is already in order
    index: torch.Tensor  # [Ta] int32: tokens that have an adapter, grouped by slot (ascending)
    active_slots: torch.Tensor  # [Ta] int32: the slot of each token in `index`
    token_slots: torch.Tensor  # [T] int32: every token's slot in token order, -1 = base model
    seg_slots: torch.Tensor  # [G] int32: slot of each segment
    seg_starts: torch.Tensor  # [G] int32: first position of each segment in `index`
    seg_lens: torch.Tensor  # [G] int32: tokens in each segment

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
        index = [row * per_row + t for row in self.order for t in range(per_row)]  # [Ta]
        active_slots = [self.row_slots[row] for row in self.order for _ in range(per_row)]  # [Ta]
        token_slots = [slot for slot in self.row_slots for _ in range(per_row)]  # [T]
        segments = tuple((slot, start * per_row, end * per_row) for slot, start, end in self.segments)
        seg_slots = [slot for slot, _, _ in segments]
        seg_starts = [start for _, start, _ in segments]
        seg_lens = [end - start for _, start, end in segments]
        # one host-to-device copy for all of them
        packed = torch.tensor(index + active_slots + token_slots + seg_slots + seg_starts + seg_lens,
                              dtype=torch.int32).to(device)
        sizes = (len(index), len(active_slots), len(token_slots), len(segments), len(segments), len(segments))
        parts = torch.split(packed, sizes)
        mapping = TokenMapping(
            num_tokens=num_tokens,
            tokens_per_row=per_row,
            segments=segments,
            identity=self.order == tuple(range(self.num_rows)),
            index=parts[0],
            active_slots=parts[1],
            token_slots=parts[2],
            seg_slots=parts[3],
            seg_starts=parts[4],
            seg_lens=parts[5],
        )
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
        self.held = None  # the cache `Hold` of the forward in flight (called with `adapter_names`)
