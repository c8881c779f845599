"""Pure-torch reference of the LoRA ops: simple enough to be obviously right. Never imports triton."""

from __future__ import annotations

import torch


def add_lora_reference(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor
) -> None:
    """Add each token's LoRA delta to `y`, one token at a time, accumulating in fp32.

    Semantics:
      y[i] += x[i] @ lora_a[s].T @ lora_b[s].T      for every i with s = token_slots[i] >= 0
    Args:
      y:           [T, out]  modified in place
      x:           [T, in]
      lora_a:      [S, R, in]
      lora_b:      [S, out, R]  scaling already folded in
      token_slots: [T] int, -1 = no adapter (row left untouched)
    """
    for i, slot in enumerate(token_slots.tolist()):
        if slot < 0:
            continue
        h = x[i].float() @ lora_a[slot].float().T  # [R]
        y[i] += (h @ lora_b[slot].float().T).to(y.dtype)  # [out]
