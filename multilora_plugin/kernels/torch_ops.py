"""The torch backend: the LoRA delta over the sorted segments of a `TokenMapping`.

On CPU one grouped GEMM per projection (shrink, then expand) covers every segment at once, so the
cost does not grow with the number of distinct adapters in Python. Layouts that grouped GEMM does not
take (rank or feature sizes whose rows are not 16-byte multiples, any non-CPU device for now) run one
matmul pair per segment on contiguous slices.
"""

from __future__ import annotations

import torch

from ..mapping import TokenMapping

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)


def _grouped_mm_takes(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Grouped GEMM wants CPU tensors whose rows start on 16-byte boundaries."""
    if _grouped_mm is None or x.device.type != "cpu":
        return False
    size = x.element_size()
    return all(n * size % 16 == 0 for n in (lora_a.shape[1], lora_a.shape[2], lora_b.shape[1]))


class TorchBackend:
    """LoRA ops in plain torch; correct on every device, fast on CPU."""

    name = "torch"

    def add_lora(
        self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, tokens: TokenMapping
    ) -> None:
        """Add the LoRA delta of every token's slot to `y`.

        Semantics:
          y[i] += x[i] @ lora_a[s].T @ lora_b[s].T      for every token i whose row has slot s >= 0
        Args:
          y:       [T, out]  modified in place
          x:       [T, in]
          lora_a:  [S, R, in]
          lora_b:  [S, out, R]  scaling already folded in
          tokens:  the mapping of these T tokens (index of tokens with an adapter, per-slot offsets)
        """
        if tokens.num_tokens == 0:
            return
        xs = x.contiguous() if tokens.identity else x.index_select(0, tokens.index)  # [Ta, in], by slot
        if _grouped_mm_takes(x, lora_a, lora_b):
            h = _grouped_mm(xs, lora_a.transpose(1, 2), offs=tokens.offsets)  # [Ta, R]
            delta = _grouped_mm(h, lora_b.transpose(1, 2), offs=tokens.offsets)  # [Ta, out]
        else:
            delta = xs.new_empty(xs.shape[0], lora_b.shape[1])  # [Ta, out]
            for slot, start, end in tokens.segments:
                h = xs[start:end] @ lora_a[slot].T  # [n, R]
                torch.matmul(h, lora_b[slot].T, out=delta[start:end])
        if tokens.identity:
            y.add_(delta)
        else:
            y.index_add_(0, tokens.index, delta)
