"""DoRA (`use_dora=True`), mixed per row: the magnitude rescale, computed once when a slot is written.

PEFT's DoRA layer computes, for an adapter with magnitude m [out] and scaled delta ΔW = s * B @ A,

    g = m / ||W + ΔW||_row                       (the row norms of the merged weight, [out])
    y = base(x) + (g - 1) * (base(x) - bias) + g * (ΔW @ x)

g depends only on the base weight and the adapter, never on the input: it is computed here when the
slot is written, `g * s * B` goes into the slot's `lora_b`, and the layer adds `(g - 1) * (base(x) -
bias)` for the rows of that slot (`MultiLoRALinear`'s row terms).

The norm needs the weight the base layer's forward uses. A floating-point weight is that weight; a
bitsandbytes one is read through the layer's own forward, one block of the identity at a time (each
output then holds one weight exactly): bitsandbytes repacks 4-bit weights for its CPU kernel at the
first forward, after which dequantizing them (PEFT's `dequantize_module_weight`) gives other values.
Other quantized layers (torchao, optimum-quanto) are dequantized with PEFT's `dequantize_module_weight`.
"""

from __future__ import annotations

import torch
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from transformers.pytorch_utils import Conv1D


BLOCK = 1024  # identity columns per forward when a weight is read through its layer


@torch.no_grad()
def base_weight(base_layer: nn.Module, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """[out, in] in fp32: the weight the base layer's forward applies."""
    weight = base_layer.weight
    if weight.dtype.is_floating_point:
        weight = dequantize_module_weight(base_layer)
        return (weight.T if isinstance(base_layer, Conv1D) else weight).float()
    columns = []
    bias = getattr(base_layer, "bias", None)
    for start in range(0, in_features, BLOCK):
        n = min(BLOCK, in_features - start)
        eye = torch.zeros(n, in_features, device=weight.device, dtype=dtype)
        eye[:, start:start + n] = torch.eye(n, device=weight.device, dtype=dtype)
        out = base_layer(eye).float()  # [n, out]: row j is W[:, start + j] (plus the bias)
        columns.append(out if bias is None else out - bias.float())
    return torch.cat(columns).T


@torch.no_grad()
def gain(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """g = magnitude / ||W + b @ a||_row, [out] in fp32. `weight` [out, in], `a` [r, in], `b` [out, r]
    (scaling folded in), all on one device."""
    merged = weight.float() + b.float() @ a.float()
    return magnitude.to(merged.device).float() / torch.linalg.norm(merged, dim=1)


@torch.no_grad()
def magnitude_gain(base_layer: nn.Module, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """`gain` with the weight the base layer's forward applies."""
    return gain(base_weight(base_layer, a.shape[1], a.dtype), a, b, magnitude)
