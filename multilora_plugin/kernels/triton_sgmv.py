"""SGMV: LoRA shrink and expand over segments of tokens that share a slot (prefill: many tokens per adapter).

One program handles BLOCK_M tokens of one segment, so each adapter's weights are read once per block of
tokens rather than once per token. Token rows are reached through `index` (tokens grouped by slot), so
activations are never gathered or scattered in memory. Per-slot ranks bound every load of `lora_a` /
`lora_b`, so the padding of a slot is never read.

`DOT_FP32` upcasts `tl.dot` operands to fp32. The wrappers set it only for CPU tensors, which only
Triton's interpreter (TRITON_INTERPRET=1) runs: its `tl.dot` multiplies the raw bits of bfloat16
operands (triton-lang/triton#11584). GPU launches keep half-precision tensor-core dots.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError
from . import tuning
from ._checks import check_expand_inputs, check_shrink_inputs, dot_precision, interpreted


@triton.jit
def _segment_tile(rank_ptr, index_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr, seg, pid_m, BLOCK_M: tl.constexpr):
    """Block `pid_m` of segment `seg`: (slot, its rank, token ids [BLOCK_M], their mask, whether any work)."""
    seg_len = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rank = tl.load(rank_ptr + slot)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    rows = tl.load(index_ptr + tl.load(seg_start_ptr + seg) + offs_m, mask=m_mask, other=0).to(tl.int64)
    return slot, rank, rows, m_mask, (rank > 0) & (pid_m * BLOCK_M < seg_len)


@triton.jit
def _sgmv_shrink_kernel(
    # pointers
    x_ptr, a_ptr, h_ptr, rank_ptr, index_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    # sizes
    K,
    # strides
    stride_xt, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_ht, stride_hr,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    slot, rank, rows, m_mask, busy = _segment_tile(rank_ptr, index_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
                                                   tl.program_id(0), tl.program_id(1), BLOCK_M)
    if not busy:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        a = tl.load(a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=r_mask[None, :] & k_mask[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, a, input_precision=DOT_PRECISION)
    tl.store(h_ptr + rows[:, None] * stride_ht + offs_r[None, :] * stride_hr, acc,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _sgmv_expand_kernel(
    # pointers
    h_ptr, b_ptr, y_ptr, rank_ptr, index_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    # sizes
    N,
    # strides
    stride_ht, stride_hr,
    stride_bs, stride_bn, stride_br,
    stride_yt, stride_yn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    slot, rank, rows, m_mask, busy = _segment_tile(rank_ptr, index_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
                                                   tl.program_id(0), tl.program_id(1), BLOCK_M)
    if not busy:
        return
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # up to this slot's rank only
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        h = tl.load(h_ptr + rows[:, None] * stride_ht + offs_r[None, :] * stride_hr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] fp32
        b = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        if DOT_FP32:
            acc += tl.dot(h, b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(h.to(b.dtype), b, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def _check_segments(index, seg_slots, seg_starts, seg_lens, device) -> None:
    for name, t in (("index", index), ("seg_slots", seg_slots), ("seg_starts", seg_starts), ("seg_lens", seg_lens)):
        if t.dtype != torch.int32 or t.dim() != 1 or t.device != device:
            raise KernelInputError(
                f"`{name}` should be a 1-D int32 tensor on {device}, but got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if not seg_slots.shape[0] == seg_starts.shape[0] == seg_lens.shape[0]:
        raise KernelInputError(
            f"segment tables should have one entry per segment, but got {seg_slots.shape[0]}, "
            f"{seg_starts.shape[0]} and {seg_lens.shape[0]}"
        )


def sgmv_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, lora_ranks: torch.Tensor, index: torch.Tensor,
    seg_slots: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor, max_segment_len: int,
    cfg: Optional[tuning.LaunchConfig] = None,
) -> torch.Tensor:
    """Semantics:
      h[index[p], :r] = x[index[p]] @ lora_a[s, :r].T   for p in segment g, s = seg_slots[g], r = lora_ranks[s]
      h[i, :] = 0                                      for tokens in no segment
    Args:
      x:          [T, in]
      lora_a:     [S, R, in]
      lora_ranks: [S] int32
      index:      [Ta] int32, tokens grouped by segment
      seg_slots, seg_starts, seg_lens: [G] int32, segment g = index[seg_starts[g] : seg_starts[g] + seg_lens[g]]
      max_segment_len: max(seg_lens), sizes the launch grid
      cfg:        the launch config (default: `tuning`'s for these sizes)
    Returns:
      h: [T, R] float32
    """
    check_shrink_inputs(x, lora_a, lora_ranks)
    _check_segments(index, seg_slots, seg_starts, seg_lens, x.device)
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    if seg_slots.shape[0] == 0 or max_segment_len == 0:
        return h
    cfg = cfg or tuning.sgmv_shrink_config(max_segment_len, lora_a.shape[1], x.shape[1])
    grid = (seg_slots.shape[0], triton.cdiv(max_segment_len, cfg.block_m))
    _sgmv_shrink_kernel[grid](
        x, lora_a, h, lora_ranks, index, seg_slots, seg_starts, seg_lens,
        x.shape[1],
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        h.stride(0), h.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, DOT_PRECISION=dot_precision(x.dtype),
        DOT_FP32=interpreted(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h


def sgmv_expand(
    y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, lora_ranks: torch.Tensor, index: torch.Tensor,
    seg_slots: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor, max_segment_len: int,
    cfg: Optional[tuning.LaunchConfig] = None,
) -> None:
    """Semantics:
      y[index[p]] += h[index[p], :r] @ lora_b[s, :, :r].T   for p in segment g, s = seg_slots[g], r = lora_ranks[s]
    Args:
      y:      [T, out]  modified in place; tokens in no segment are not written
      h:      [T, R] float32
      lora_b: [S, out, R]
      others as in `sgmv_shrink`
    """
    check_expand_inputs(y, h, lora_b, lora_ranks)
    _check_segments(index, seg_slots, seg_starts, seg_lens, y.device)
    if seg_slots.shape[0] == 0 or max_segment_len == 0:
        return
    cfg = cfg or tuning.sgmv_expand_config(max_segment_len, lora_b.shape[2], y.shape[1])
    grid = (seg_slots.shape[0], triton.cdiv(max_segment_len, cfg.block_m), triton.cdiv(y.shape[1], cfg.block_n))
    _sgmv_expand_kernel[grid](
        h, lora_b, y, lora_ranks, index, seg_slots, seg_starts, seg_lens,
        y.shape[1],
        h.stride(0), h.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r, DOT_PRECISION=dot_precision(lora_b.dtype),
        DOT_FP32=interpreted(y),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
