"""Kernel backends for the LoRA delta. A backend is chosen once, when a model is wrapped.

Every backend offers the same three ops over a `TokenMapping`: `lora_shrink`, `lora_expand` and the
fused `add_lora` that `MultiLoRALinear` calls, over a layer's `SlotBank` (each slot's A and Bᵀ at its
own rank, anywhere in one storage). `reference.py` holds the pure-torch oracle (padded slot tensors).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Union

import torch

from ..errors import ConfigError
from .bank import SlotBank
from .reference import add_lora_reference, lora_expand_reference, lora_shrink_reference
from .torch_ops import TorchBackend

__all__ = [
    "SlotBank",
    "TorchBackend",
    "add_lora_reference",
    "lora_expand_reference",
    "lora_shrink_reference",
    "select_backend",
]


def select_backend(name: str, device: Union[str, torch.device]):
    """The backend object every patched layer of a model on `device` calls.

    "auto": Triton SGMV/BGMV kernels for CUDA models when triton is installed, the torch path otherwise.
    "torch": the torch path everywhere. "triton": the kernels; on a CPU model only under Triton's
    interpreter (TRITON_INTERPRET=1), which is how the tests run them without a GPU.
    """
    device = torch.device(device)
    has_triton = importlib.util.find_spec("triton") is not None
    if name == "torch" or (name == "auto" and (device.type != "cuda" or not has_triton)):
        return TorchBackend()
    if name not in ("auto", "triton"):
        raise ConfigError(f"`backend` should be 'auto', 'torch' or 'triton', but got {name!r}")
    if not has_triton:
        raise ConfigError("backend 'triton' was asked for, but triton is not installed (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"backend 'triton' needs a CUDA model, but the model is on {device}; use backend='auto' or 'torch', "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU (slow, for testing)"
        )
    from .triton_ops import TritonBackend

    return TritonBackend()
