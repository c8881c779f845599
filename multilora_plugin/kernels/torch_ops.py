"""The torch backend: LoRA ops in plain torch over a `TokenMapping`. Correct on every device, tuned for CPU.

`add_lora` picks one of two shapes of work from the mapping, the same for every layer of a call:
- segments: one matmul pair per segment, on contiguous slices of the slot buffers cut to the slot's
  rank. Used for a single adapter, for prefill, and whenever adapters shared by several tokens have
  large weights.
- batched: when many adapters have few tokens each (decode with distinct adapters), two batched
  matmuls do all tokens at once, each token with its slot's rank-cut weights. A Python loop over
  segments would cost more than the arithmetic. With one token per slot over a contiguous range of
  slots, the slot buffers are used in place; otherwise each token's weights are gathered.
"""

from __future__ import annotations

import torch

from ..mapping import TokenMapping

# What one more segment costs the loop (two small matmuls and their slicing, ~20 us on a 2-core CPU),
# counted in bytes of weights that the batched path copies in that time. Calibrated with
# benchmarks/bench_kernels.py: the break-even lay between 0.5 and 1.3 MiB on the CPU measured.
SEGMENT_OVERHEAD_BYTES = 768 * 1024


def _slot_range(tokens: TokenMapping):
    """(first, last) when the batch has one token per slot over the contiguous slots first..last."""
    first, last = tokens.segments[0][0], tokens.segments[-1][0]
    if tokens.num_active == len(tokens.segments) == last - first + 1:
        return first, last
    return None


def _batched_plan(tokens: TokenMapping, ranks: list, lora_a: torch.Tensor, lora_b: torch.Tensor):
    """(r, slot range) when two batched matmuls beat a loop over the segments, else None.

    The batched path copies each token's weights cut to r, the batch's largest rank (unless the slot
    buffers can serve in place); the loop pays a fixed overhead per segment. Choose the cheaper.
    """
    segments = len(tokens.segments)
    if segments < 2:
        return None
    r = max(ranks[slot] for slot, _, _ in tokens.segments)
    slot_range = _slot_range(tokens)
    copied = tokens.num_active * r * (lora_a.shape[2] + lora_b.shape[1]) * lora_a.element_size()
    if slot_range is None and copied > segments * SEGMENT_OVERHEAD_BYTES:
        return None
    return r, slot_range


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
        """
        if not tokens.segments:
            return
        ranks = lora_ranks.tolist()
        plan = _batched_plan(tokens, ranks, lora_a, lora_b)
        if plan is None:
            self._add_segments(y, x, lora_a, lora_b, ranks, tokens)
        else:
            self._add_batched(y, x, lora_a, lora_b, *plan, tokens)

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
    def _add_batched(y, x, lora_a, lora_b, r: int, slot_range, tokens: TokenMapping) -> None:
        """Two bmm over all tokens, each with its slot's weights cut to rank `r` (the batch's largest)."""
        if not r:
            return
        if slot_range is not None:
            # one token per slot and the slots are a contiguous range: the slot buffers, in slot order,
            # already are the per-token weights
            first, last = slot_range
            xs = x if tokens.identity else x.index_select(0, tokens.index)  # [Ta, in], in slot order
            a, b = lora_a[first:last + 1, :r], lora_b[first:last + 1, :, :r]  # [Ta, r, in], [Ta, out, r]
            in_place = tokens.identity
        else:
            in_place = tokens.all_active  # then each token reads its own slot, in token order
            xs = x if in_place else x.index_select(0, tokens.index)
            slots = tokens.token_slots if in_place else tokens.active_slots
            a = lora_a[:, :r].index_select(0, slots)  # [Ta, r, in]
            b = lora_b[:, :, :r].index_select(0, slots)  # [Ta, out, r]
        h = torch.bmm(xs.unsqueeze(1), a.transpose(1, 2))  # [Ta, 1, r]
        if in_place:
            y.unsqueeze(1).baddbmm_(h, b.transpose(1, 2))  # [T, 1, out]
        else:
            y.index_add_(0, tokens.index, torch.bmm(h, b.transpose(1, 2)).squeeze(1))
