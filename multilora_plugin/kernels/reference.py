"""Pure-torch reference of the LoRA ops: one token at a time, fp32, simple enough to be obviously right.

Every backend's ops are tested against these. This module never imports triton.

Shared argument shapes:
  x:           [T, in]
  y:           [T, out]
  lora_a:      [S, R, in]     slot s holds lora_A in rows :rank[s], zeros after
  lora_b:      [S, out, R]    slot s holds lora_B * scaling in columns :rank[s], zeros after
  lora_ranks:  [S] int        the true rank in each slot
  token_slots: [T] int        each token's slot, -1 = no adapter
"""

from __future__ import annotations

import torch


def lora_shrink_reference(
    x: torch.Tensor, lora_a: torch.Tensor, lora_ranks: torch.Tensor, token_slots: torch.Tensor
) -> torch.Tensor:
    """Semantics:
      h[i, :r] = x[i] @ lora_a[s, :r].T      for every i with s = token_slots[i] >= 0, r = lora_ranks[s]
      h[i, :]  = 0                           everywhere else
    Returns:
      h: [T, R] float32
    """
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for i, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            r = int(lora_ranks[slot])
            h[i, :r] = x[i].float() @ lora_a[slot, :r].float().T
    return h


def lora_expand_reference(
    y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, lora_ranks: torch.Tensor, token_slots: torch.Tensor
) -> None:
    """Semantics:
      y[i] += h[i, :r] @ lora_b[s, :, :r].T   for every i with s = token_slots[i] >= 0, r = lora_ranks[s]
    Args:
      y: [T, out] modified in place; rows with slot -1 are not written
      h: [T, R]
    """
    for i, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            r = int(lora_ranks[slot])
            y[i] += (h[i, :r].float() @ lora_b[slot, :, :r].float().T).to(y.dtype)


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_ranks: torch.Tensor,
    token_slots: torch.Tensor,
) -> None:
    """Semantics:
      y[i] += x[i] @ lora_a[s].T @ lora_b[s].T     for every i with s = token_slots[i] >= 0
    Args:
      y: [T, out] modified in place; rows with slot -1 are not written
    """
    lora_expand_reference(y, lora_shrink_reference(x, lora_a, lora_ranks, token_slots), lora_b, lora_ranks, token_slots)
