"""The torch backend: LoRA ops in plain torch over a `TokenMapping`. Correct on every device, tuned for CPU.

`add_lora` picks one of three shapes of work from the mapping and the layer's size:
- segments: one matmul pair per segment, on contiguous slices of the slot buffers cut to the slot's
  rank. The cheapest for one adapter, and for long runs of tokens per adapter (prefill).
- stacked: every token against every slot of the batch's slot range in two matmuls (the slot
  buffers of the range, cut to its largest rank, are one `[n * r, in]` matrix), then each token
  keeps its own slot's part. No weights are gathered per token and no Python loop runs over
  adapters, at the price of n times the (small) LoRA arithmetic: the cheapest for decode and for
  the mixed steps of transformers' continuous batching, where many adapters have a few tokens each.
- in place: one token per slot over a contiguous range of slots (distinct adapters, decode): the
  slot buffers, in slot order, already are the per-token weights; two batched matmuls.

The choice between segments and stacked weighs their cost in microseconds: the arithmetic of each,
the weights the stacked path copies, and a fixed cost per segment (`MACS_PER_US`, `COPY_BYTES_PER_US`,
`SEGMENT_US`, measured with benchmarks/bench_kernels.py on the 2-core CPU these numbers come from).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..mapping import TokenMapping

MACS_PER_US = 70_000  # fp32 multiply-adds per microsecond of small matmuls (2 cores)
COPY_BYTES_PER_US = 10_000  # copying weights (the stacked path's [n * r, out] B, and A cut below the buffers' rank)
SEGMENT_US = 25  # one more segment in the loop: two small matmuls and their slicing


def _plan(tokens: TokenMapping, ranks: list, lora_a: torch.Tensor, lora_b: torch.Tensor):
    """(shape, r): "segments", "stacked" or "in_place", the cheapest shape of work, and the largest
    rank in the batch's slot range."""
    first, last = tokens.segments[0][0], tokens.segments[-1][0]
    n, segments = last - first + 1, len(tokens.segments)
    r = max(ranks[first:last + 1])
    if segments > 1 and tokens.num_active == segments == n:
        return "in_place", r
    width = lora_a.shape[2] + lora_b.shape[1]
    used = max(ranks[slot] for slot, _, _ in tokens.segments)
    copied = n * r * (lora_b.shape[1] + (lora_a.shape[2] if r < lora_a.shape[1] else 0)) * lora_a.element_size()
    stacked_us = tokens.num_tokens * n * r * width / MACS_PER_US + copied / COPY_BYTES_PER_US
    segments_us = segments * SEGMENT_US + tokens.num_active * used * width / MACS_PER_US
    return ("stacked" if segments > 1 and stacked_us < segments_us else "segments"), r


class TorchBackend:
    """LoRA ops in plain torch. Stateless: one instance serves every layer of a model."""

    name = "torch"

    def lora_shrink(
        self, x: torch.Tensor, lora_a: torch.Tensor, lora_ranks: torch.Tensor, tokens: TokenMapping
    ) -> torch.Tensor:
        """Semantics:
          h[i, :r] = x[i] @ lora_a[s, :r].T      for every token i with slot s >= 0, r = lora_ranks[s]
          h[i, :]  = 0                           everywhere else
        Args:
          x:          [T, in]
          lora_a:     [S, R, in]
          lora_ranks: [S] int32
        Returns:
          h: [T, R] float32
        """
        h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
        ranks = lora_ranks.tolist()
        for slot, start, end in tokens.segments:
            r = ranks[slot]
            rows = tokens.index[start:end]
            h[rows, :r] = (x.index_select(0, rows) @ lora_a[slot, :r].T).float()  # [n, r]
        return h

    def lora_expand(
        self, y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, lora_ranks: torch.Tensor, tokens: TokenMapping
    ) -> None:
        """Semantics:
          y[i] += h[i, :r] @ lora_b[s, :, :r].T   for every token i with slot s >= 0, r = lora_ranks[s]
        Args:
          y:          [T, out]  modified in place; tokens of slot -1 are not written
          h:          [T, R]
          lora_b:     [S, out, R]
          lora_ranks: [S] int32
        """
        ranks = lora_ranks.tolist()
        for slot, start, end in tokens.segments:
            r = ranks[slot]
            rows = tokens.index[start:end]
            delta = h.index_select(0, rows)[:, :r].to(lora_b.dtype) @ lora_b[slot, :, :r].T  # [n, out]
            y.index_add_(0, rows, delta.to(y.dtype))

    def add_lora(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        lora_ranks: torch.Tensor,
        tokens: TokenMapping,
        host_ranks: Optional[Sequence[int]] = None,
    ) -> None:
        """Add the LoRA delta of every token's slot to `y` (shrink and expand in one call).

        Semantics:
          y[i] += x[i] @ lora_a[s].T @ lora_b[s].T      for every token i with slot s >= 0
        Args:
          y:          [T, out]  modified in place; tokens of slot -1 are not written
          x:          [T, in]
          lora_a:     [S, R, in]
          lora_b:     [S, out, R]  scaling already folded in
          lora_ranks: [S] int32; the padding past a slot's rank is never read
          host_ranks: the same on the host (the layer keeps them), so that no layer waits for the device
        """
        if not tokens.segments:
            return
        ranks = lora_ranks.tolist() if host_ranks is None else host_ranks
        shape, r = _plan(tokens, ranks, lora_a, lora_b)
        if not r:
            return  # no slot of the batch holds any rank
        if shape == "segments":
            self._add_segments(y, x, lora_a, lora_b, ranks, tokens)
        elif shape == "stacked":
            self._add_stacked(y, x, lora_a, lora_b, r, tokens)
        else:
            self._add_in_place(y, x, lora_a, lora_b, r, tokens)

    @staticmethod
    def _add_segments(y, x, lora_a, lora_b, ranks, tokens: TokenMapping) -> None:
        if tokens.identity:  # every token has an adapter, already in slot order: work on y in place
            xs, out = x, y
        else:
            xs = x.index_select(0, tokens.index)  # [Ta, in], grouped by slot
            out = y.new_zeros(xs.shape[0], y.shape[1])  # [Ta, out]
        full_rank, whole = lora_a.shape[1], (0, xs.shape[0])
        for slot, start, end in tokens.segments:
            r = ranks[slot]
            if not r:
                continue
            a, b = (lora_a[slot], lora_b[slot]) if r == full_rank else (lora_a[slot, :r], lora_b[slot, :, :r])
            if (start, end) == whole:  # one segment: no slicing
                out.addmm_(xs @ a.T, b.T)  # [T, r] @ [r, out]
            else:
                out[start:end].addmm_(xs[start:end] @ a.T, b.T)  # [n, r] @ [r, out]
        if out is not y:
            y.index_add_(0, tokens.index, out)

    @staticmethod
    def _add_stacked(y, x, lora_a, lora_b, r: int, tokens: TokenMapping) -> None:
        """Every token against every slot of the range, each keeping its own slot's part."""
        first, last = tokens.segments[0][0], tokens.segments[-1][0]
        n = last - first + 1
        a = lora_a[first:last + 1, :r].reshape(n * r, -1)  # [n * r, in]: a view when r is the buffers' rank
        b = lora_b[first:last + 1, :, :r].transpose(1, 2).reshape(n * r, -1)  # [n * r, out]
        h = x @ a.T  # [T, n * r]
        h.mul_(tokens.slot_mask(first, n, r, h.dtype))  # other slots' parts (and base tokens) zeroed; the
        # padding past a slot's rank is zero in every slot buffer, so nothing non-finite is multiplied
        y.addmm_(h, b)  # [T, n * r] @ [n * r, out]

    @staticmethod
    def _add_in_place(y, x, lora_a, lora_b, r: int, tokens: TokenMapping) -> None:
        """One token per slot over a contiguous slot range: the slot buffers, in slot order, are the
        per-token weights."""
        first, last = tokens.segments[0][0], tokens.segments[-1][0]
        xs = x if tokens.identity else x.index_select(0, tokens.index)  # [Ta, in], in slot order
        a, b = lora_a[first:last + 1, :r], lora_b[first:last + 1, :, :r]  # [Ta, r, in], [Ta, out, r]
        h = torch.bmm(xs.unsqueeze(1), a.transpose(1, 2))  # [Ta, 1, r]
        if tokens.identity:
            y.unsqueeze(1).baddbmm_(h, b.transpose(1, 2))  # [T, 1, out]
        else:
            y.index_add_(0, tokens.index, torch.bmm(h, b.transpose(1, 2)).squeeze(1))
