"""Kernel backends for the LoRA delta. A backend is chosen once, when a model is wrapped."""

from __future__ import annotations

from ..errors import ConfigError
from .reference import add_lora_reference
from .torch_ops import TorchBackend

__all__ = ["TorchBackend", "add_lora_reference", "select_backend"]


def select_backend(name: str) -> TorchBackend:
    """The backend object every patched layer of a model calls.

    "auto" and "torch" give the torch backend on every device. The Triton SGMV/BGMV kernels for CUDA
    are not part of this release, so "triton" is refused rather than silently replaced.
    """
    if name in ("auto", "torch"):
        return TorchBackend()
    if name == "triton":
        raise ConfigError(
            "backend 'triton' was asked for, but this release ships only the torch backend; "
            "use backend='auto' or backend='torch'"
        )
    raise ConfigError(f"`backend` should be 'auto', 'torch' or 'triton', but got {name!r}")
