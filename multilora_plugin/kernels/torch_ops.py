"""The torch backend: LoRA ops in plain torch over a `TokenMapping` and a `SlotBank`. Correct on every
device, tuned for CPU.

`add_lora` picks one of two shapes of work from the mapping and the layer's size:
- segments: one matmul pair per segment, on the slot's own A and Bᵀ (views at its true rank). The
  cheapest for one adapter, and for long runs of tokens per adapter (prefill).
- stacked: every token against every adapter of the batch in two matmuls (the batch's A and Bᵀ
  concatenated, `[Σr, in]` and `[Σr, out]`), then each token keeps its own adapter's columns. No
  Python loop runs over adapters, at the price of n times the (small) LoRA arithmetic: the cheapest
  for decode and for the mixed steps of transformers' continuous batching, where many adapters have
  a few tokens each. Only the batch's adapters are read, however many are resident.

The stacked path keeps each layer's stacked pairs from step to step (`kernels/stack.py`), copying only
the pairs of adapters that joined the batch; the plan counts what it would copy.

The choice between segments and stacked weighs their cost in microseconds: the arithmetic of each,
the weights the stacked path copies, and a fixed cost per segment (`MACS_PER_US`, `COPY_BYTES_PER_US`,
`SEGMENT_US`, measured with benchmarks/bench_kernels.py on the 2-core CPU these numbers come from).
"""

from __future__ import annotations

import torch

from ..mapping import TokenMapping
from .bank import SlotBank

MACS_PER_US = 70_000  # fp32 multiply-adds per microsecond of small matmuls (2 cores)
COPY_BYTES_PER_US = 10_000  # copying weights (the stacked path's concatenated A and B)
SEGMENT_US = 25  # one more segment in the loop: two small matmuls and their slicing




def _plan(tokens: TokenMapping, segments: list, bank: SlotBank) -> str:
    """"segments" or "stacked": the cheapest shape of work for the batch's `segments`
    (those whose slot has a rank in this layer)."""
    used = [bank.host_ranks[slot] for slot, _, _ in segments]
    if len(segments) == 1:
        return "segments"
    width = bank.in_features + bank.out_features
    total = sum(used)
    slots = tuple(s for s, _, _ in segments)
    rows = max(total, len(bank.stack.owners) * bank.stack.rank)  # the kept blocks of adapters not in the batch too
    costs = {
        "stacked": tokens.num_tokens * rows * width / MACS_PER_US + bank.copy_bytes(slots) / COPY_BYTES_PER_US,
        "segments": len(segments) * SEGMENT_US
        + sum((end - start) * r for (_, start, end), r in zip(segments, used)) * width / MACS_PER_US,
    }
    return min(costs, key=costs.get)


class TorchBackend:
    """LoRA ops in plain torch. Stateless: one instance serves every layer of a model."""

    name = "torch"

    def lora_shrink(self, x: torch.Tensor, bank: SlotBank, tokens: TokenMapping) -> torch.Tensor:
        """Semantics:
          h[i, :r] = x[i] @ A_s.T      for every token i with slot s >= 0, r = rank of s
          h[i, :]  = 0                 everywhere else
        Args:
          x:    [T, in]
          bank: the slots' A [r, in] and Bᵀ [r, out]
        Returns:
          h: [T, R] float32, R the largest rank of the batch's slots
        """
        h = torch.zeros(x.shape[0], bank.max_rank(s for s, _, _ in tokens.segments), dtype=torch.float32,
                        device=x.device)
        for slot, start, end in tokens.segments:
            r = bank.host_ranks[slot]
            if r:
                rows = tokens.index[start:end]
                h[rows, :r] = (x.index_select(0, rows) @ bank.a[slot].T).float()  # [n, r]
        return h

    def lora_expand(self, y: torch.Tensor, h: torch.Tensor, bank: SlotBank, tokens: TokenMapping) -> None:
        """Semantics:
          y[i] += h[i, :r] @ Bᵀ_s      for every token i with slot s >= 0, r = rank of s
        Args:
          y: [T, out]  modified in place; tokens of slot -1 are not written
          h: [T, R], R >= the batch's ranks
        """
        for slot, start, end in tokens.segments:
            r = bank.host_ranks[slot]
            if r:
                rows = tokens.index[start:end]
                delta = h.index_select(0, rows)[:, :r].to(bank.dtype) @ bank.b[slot]  # [n, out]
                y.index_add_(0, rows, delta.to(y.dtype))

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, bank: SlotBank, tokens: TokenMapping) -> None:
        """Add the LoRA delta of every token's slot to `y` (shrink and expand in one call).

        Semantics:
          y[i] += x[i] @ A_s.T @ Bᵀ_s      for every token i with slot s >= 0 (scaling folded into B)
        Args:
          y:    [T, out]  modified in place; tokens of slot -1 are not written
          x:    [T, in]
          bank: the slots' pairs; the host ranks decide the work, so no layer waits for the device
        """
        segments = [seg for seg in tokens.segments if bank.host_ranks[seg[0]]]  # adapters that change this layer
        if not segments:
            return
        shape = _plan(tokens, segments, bank)
        if shape == "segments":
            self._add_segments(y, x, bank, tokens, segments)
        else:
            self._add_stacked(y, x, bank, tokens, segments)

    @staticmethod
    def _add_segments(y, x, bank: SlotBank, tokens: TokenMapping, segments: list) -> None:
        if tokens.identity:  # every token has an adapter, already in slot order: work on y in place
            xs, out = x, y
        else:
            xs = x.index_select(0, tokens.index)  # [Ta, in], grouped by slot
            out = y.new_zeros(xs.shape[0], y.shape[1])  # [Ta, out]
        whole = (0, xs.shape[0])
        for slot, start, end in segments:
            a, b = bank.a[slot], bank.b[slot]  # [r, in], [r, out]
            if (start, end) == whole:  # one segment: no slicing
                out.addmm_(xs @ a.T, b)  # [T, r] @ [r, out]
            else:
                out[start:end].addmm_(xs[start:end] @ a.T, b)  # [n, r] @ [r, out]
        if out is not y:
            y.index_add_(0, tokens.index, out)

    @staticmethod
    def _add_stacked(y, x, bank: SlotBank, tokens: TokenMapping, segments: list) -> None:
        """Every token against every adapter of the batch, each keeping its own adapter's columns."""
        a, b, owners = bank.stacked(tuple(slot for slot, _, _ in segments))  # [Σr, in], [Σr, out]
        h = x @ a.T  # [T, Σr]
        h.mul_(tokens.rank_mask(owners, h.dtype))  # other adapters' columns zeroed
        y.addmm_(h, b)  # [T, Σr] @ [Σr, out]
