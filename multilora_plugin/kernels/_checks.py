"""Input checks shared by the Triton op wrappers. They fail with `KernelInputError` before any launch."""

from __future__ import annotations

import torch

from ..errors import KernelInputError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tables(offsets: torch.Tensor, lora_ranks: torch.Tensor, device: torch.device) -> None:
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.device != device:
        raise KernelInputError(f"the slot offsets should be a 1-D int64 tensor on {device}, but got "
                               f"{offsets.dtype} {tuple(offsets.shape)} on {offsets.device}")
    if lora_ranks.dtype != torch.int32 or lora_ranks.shape != offsets.shape or lora_ranks.device != device:
        raise KernelInputError(
            f"`lora_ranks` should be an int32 tensor of shape {tuple(offsets.shape)} on {device}, but got "
            f"{lora_ranks.dtype} {tuple(lora_ranks.shape)} on {lora_ranks.device}"
        )


def check_shrink_inputs(x: torch.Tensor, storage: torch.Tensor, a_offsets: torch.Tensor,
                        lora_ranks: torch.Tensor) -> None:
    if x.dim() != 2 or storage.dim() != 1:
        raise KernelInputError(f"expected x [T, in] and a 1-D weight storage, but got {tuple(x.shape)} and "
                               f"{tuple(storage.shape)}")
    if x.dtype not in FLOAT_DTYPES or x.dtype != storage.dtype:
        raise KernelInputError(f"x and the weight storage should share one of {FLOAT_DTYPES}, but got {x.dtype} "
                               f"and {storage.dtype}")
    if x.device != storage.device:
        raise KernelInputError(f"x and the weight storage should be on one device, but got {x.device} and "
                               f"{storage.device}")
    _check_tables(a_offsets, lora_ranks, x.device)


def check_expand_inputs(y: torch.Tensor, h: torch.Tensor, storage: torch.Tensor, b_offsets: torch.Tensor,
                        lora_ranks: torch.Tensor) -> None:
    if y.dim() != 2 or h.dim() != 2 or storage.dim() != 1 or y.shape[0] != h.shape[0]:
        raise KernelInputError(
            f"expected y [T, out], h [T, R] and a 1-D weight storage, but got {tuple(y.shape)}, "
            f"{tuple(h.shape)} and {tuple(storage.shape)}"
        )
    if h.dtype != torch.float32:
        raise KernelInputError(f"h should be float32 (the shrink's accumulator), but got {h.dtype}")
    if y.dtype not in FLOAT_DTYPES or storage.dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"y and the weight storage should be one of {FLOAT_DTYPES}, but got {y.dtype} "
                               f"and {storage.dtype}")
    if not y.device == h.device == storage.device:
        raise KernelInputError(f"y, h and the weight storage should be on one device, but got {y.device}, "
                               f"{h.device}, {storage.device}")
    _check_tables(b_offsets, lora_ranks, y.device)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep full precision in `tl.dot` (PEFT parity); half types use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreted(t: torch.Tensor) -> bool:
    """Whether a launch on `t` runs in Triton's interpreter: only it takes CPU tensors."""
    return t.device.type == "cpu"
