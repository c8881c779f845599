"""Input checks shared by the Triton op wrappers. They fail with `KernelInputError` before any launch."""

from __future__ import annotations

import torch

from ..errors import KernelInputError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_ranks(lora_ranks: torch.Tensor, num_slots: int, device: torch.device) -> None:
    if lora_ranks.dtype != torch.int32 or tuple(lora_ranks.shape) != (num_slots,) or lora_ranks.device != device:
        raise KernelInputError(
            f"`lora_ranks` should be an int32 tensor of shape ({num_slots},) on {device}, but got "
            f"{lora_ranks.dtype} {tuple(lora_ranks.shape)} on {lora_ranks.device}"
        )


def check_shrink_inputs(x: torch.Tensor, lora_a: torch.Tensor, lora_ranks: torch.Tensor) -> None:
    if x.dim() != 2 or lora_a.dim() != 3 or x.shape[1] != lora_a.shape[2]:
        raise KernelInputError(
            f"expected x [T, in] and lora_a [S, R, in], but got {tuple(x.shape)} and {tuple(lora_a.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES or x.dtype != lora_a.dtype:
        raise KernelInputError(f"x and lora_a should share one of {FLOAT_DTYPES}, but got {x.dtype} and {lora_a.dtype}")
    if x.device != lora_a.device:
        raise KernelInputError(f"x and lora_a should be on one device, but got {x.device} and {lora_a.device}")
    _check_ranks(lora_ranks, lora_a.shape[0], x.device)


def check_expand_inputs(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, lora_ranks: torch.Tensor) -> None:
    if y.dim() != 2 or h.dim() != 2 or lora_b.dim() != 3 or y.shape[0] != h.shape[0] \
            or y.shape[1] != lora_b.shape[1] or h.shape[1] != lora_b.shape[2]:
        raise KernelInputError(
            f"expected y [T, out], h [T, R] and lora_b [S, out, R], but got {tuple(y.shape)}, "
            f"{tuple(h.shape)} and {tuple(lora_b.shape)}"
        )
    if h.dtype != torch.float32:
        raise KernelInputError(f"h should be float32 (the shrink's accumulator), but got {h.dtype}")
    if y.dtype not in FLOAT_DTYPES or lora_b.dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"y and lora_b should be one of {FLOAT_DTYPES}, but got {y.dtype} and {lora_b.dtype}")
    if not y.device == h.device == lora_b.device:
        raise KernelInputError(f"y, h and lora_b should be on one device, but got {y.device}, {h.device}, {lora_b.device}")
    _check_ranks(lora_ranks, lora_b.shape[0], y.device)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep full precision in `tl.dot` (PEFT parity); half types use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreted(t: torch.Tensor) -> bool:
    """Whether a launch on `t` runs in Triton's interpreter: only it takes CPU tensors."""
    return t.device.type == "cpu"
