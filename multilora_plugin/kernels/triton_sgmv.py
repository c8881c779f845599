"""SGMV: LoRA shrink and expand over segments of tokens that share a slot (prefill: many tokens per adapter).

One program handles BLOCK_M tokens of one segment, so each adapter's weights are read once per block of
tokens rather than once per token. Token rows are reached through `index` (tokens grouped by slot), so
activations are never gathered or scattered in memory. Each slot's A [r, in] and Bᵀ [r, out] are read
from the bank's storage at that slot's offsets, up to its own rank (`bank.py`: nothing is padded).

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
    x_ptr, w_ptr, a_off_ptr, h_ptr, rank_ptr, index_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    # sizes
    K,
    # strides
    stride_xt, stride_xk,
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
    a_base = w_ptr + tl.load(a_off_ptr + slot)  # A of this slot: [rank, K], row-major
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        a = tl.load(a_base + offs_r[None, :] * K + offs_k[:, None],
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
    h_ptr, w_ptr, b_off_ptr, y_ptr, rank_ptr, index_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    # sizes
    N,
    # strides
    stride_ht, stride_hr,
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
    b_base = w_ptr + tl.load(b_off_ptr + slot)  # Bᵀ of this slot: [rank, N], row-major
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # up to this slot's rank only
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        h = tl.load(h_ptr + rows[:, None] * stride_ht + offs_r[None, :] * stride_hr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] fp32
        b = tl.load(b_base + offs_r[:, None] * N + offs_n[None, :],
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
    x: torch.Tensor, storage: torch.Tensor, a_offsets: torch.Tensor, lora_ranks: torch.Tensor, index: torch.Tensor,
    seg_slots: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor, max_segment_len: int, max_rank: int,
    cfg: Optional[tuning.LaunchConfig] = None,
) -> torch.Tensor:
    """Semantics:
      h[index[p], :r] = x[index[p]] @ A_s.T   for p in segment g, s = seg_slots[g], r = lora_ranks[s]
      h[i, :] = 0                            for tokens in no segment
    where A_s [r, in] = storage[a_offsets[s] : a_offsets[s] + r * in] (row-major).
    Args:
      x:          [T, in]
      storage:    1-D, x's dtype: every slot's weights
      a_offsets:  [S] int64; lora_ranks: [S] int32
      index:      [Ta] int32, tokens grouped by segment
      seg_slots, seg_starts, seg_lens: [G] int32, segment g = index[seg_starts[g] : seg_starts[g] + seg_lens[g]]
      max_segment_len: max(seg_lens), sizes the launch grid
      max_rank:   >= the rank of every segment's slot: h's width
      cfg:        the launch config (default: `tuning`'s for these sizes)
    Returns:
      h: [T, max_rank] float32
    """
    check_shrink_inputs(x, storage, a_offsets, lora_ranks)
    _check_segments(index, seg_slots, seg_starts, seg_lens, x.device)
    h = torch.zeros(x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    if seg_slots.shape[0] == 0 or max_segment_len == 0 or max_rank == 0:
        return h
    cfg = cfg or tuning.sgmv_shrink_config(max_segment_len, max_rank, x.shape[1])
    grid = (seg_slots.shape[0], triton.cdiv(max_segment_len, cfg.block_m))
    _sgmv_shrink_kernel[grid](
        x, storage, a_offsets, h, lora_ranks, index, seg_slots, seg_starts, seg_lens,
        x.shape[1],
        x.stride(0), x.stride(1),
        h.stride(0), h.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_R=max(cfg.block_r, triton.next_power_of_2(max_rank)), BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(x.dtype), DOT_FP32=interpreted(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h


def sgmv_expand(
    y: torch.Tensor, h: torch.Tensor, storage: torch.Tensor, b_offsets: torch.Tensor, lora_ranks: torch.Tensor,
    index: torch.Tensor, seg_slots: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor,
    max_segment_len: int, cfg: Optional[tuning.LaunchConfig] = None,
) -> None:
    """Semantics:
      y[index[p]] += h[index[p], :r] @ Bᵀ_s   for p in segment g, s = seg_slots[g], r = lora_ranks[s]
    where Bᵀ_s [r, out] = storage[b_offsets[s] : b_offsets[s] + r * out] (row-major).
    Args:
      y:      [T, out]  modified in place; tokens in no segment are not written
      h:      [T, R] float32, R >= every segment's rank
      others as in `sgmv_shrink`
    """
    check_expand_inputs(y, h, storage, b_offsets, lora_ranks)
    _check_segments(index, seg_slots, seg_starts, seg_lens, y.device)
    if seg_slots.shape[0] == 0 or max_segment_len == 0 or h.shape[1] == 0:
        return
    cfg = cfg or tuning.sgmv_expand_config(max_segment_len, h.shape[1], y.shape[1])
    grid = (seg_slots.shape[0], triton.cdiv(max_segment_len, cfg.block_m), triton.cdiv(y.shape[1], cfg.block_n))
    _sgmv_expand_kernel[grid](
        h, storage, b_offsets, y, lora_ranks, index, seg_slots, seg_starts, seg_lens,
        y.shape[1],
        h.stride(0), h.stride(1),
        y.stride(0), y.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r, DOT_PRECISION=dot_precision(storage.dtype),
        DOT_FP32=interpreted(y),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
