"""BGMV: LoRA shrink and expand with one program row per token (decode: one new token per sequence).

Each token reads its own slot from `token_slots` in token order, so decode needs no sorting, gathering
or scattering. A token of slot -1 returns at once. With few tokens, the shrink splits each token's
reduction over `split_k` programs, which add into `h` atomically.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError
from . import tuning
from ._checks import check_expand_inputs, check_shrink_inputs


@triton.jit
def _token_slot(slot_ptr, rank_ptr, token):
    """(slot, rank) of one token; rank 0 for base-model tokens (slot -1) and empty slots."""
    slot = tl.load(slot_ptr + token).to(tl.int64)
    return slot, tl.load(rank_ptr + slot, mask=slot >= 0, other=0)


@triton.jit
def _bgmv_shrink_kernel(
    # pointers
    x_ptr, w_ptr, a_off_ptr, h_ptr, rank_ptr, slot_ptr,
    # sizes
    K,
    # strides
    stride_xt, stride_xk,
    stride_ht, stride_hr,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    slot, rank = _token_slot(slot_ptr, rank_ptr, token)
    if rank == 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_base = w_ptr + tl.load(a_off_ptr + slot)  # A of this slot: [rank, K], row-major
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):  # this program's share of the reduction
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + token * stride_xt + offs_k * stride_xk, mask=k_mask, other=0.0)  # [BLOCK_K]
        a = tl.load(a_base + offs_r[:, None] * K + offs_k[None, :],
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
        acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    h_ptrs = h_ptr + token * stride_ht + offs_r * stride_hr
    if SPLIT_K == 1:
        tl.store(h_ptrs, acc, mask=r_mask)
    else:
        tl.atomic_add(h_ptrs, acc, mask=r_mask)


@triton.jit
def _bgmv_expand_kernel(
    # pointers
    h_ptr, w_ptr, b_off_ptr, y_ptr, rank_ptr, slot_ptr,
    # sizes
    N,
    # strides
    stride_ht, stride_hr,
    stride_yt, stride_yn,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    slot, rank = _token_slot(slot_ptr, rank_ptr, token)
    if rank == 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    b_base = w_ptr + tl.load(b_off_ptr + slot)  # Bᵀ of this slot: [rank, N], row-major
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # up to this slot's rank only
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        h = tl.load(h_ptr + token * stride_ht + offs_r * stride_hr, mask=r_mask, other=0.0)  # [BLOCK_R] fp32
        b = tl.load(b_base + offs_r[None, :] * N + offs_n[:, None],
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        acc += tl.sum(b.to(tl.float32) * h[None, :], axis=1)
    y_ptrs = y_ptr + token * stride_yt + offs_n * stride_yn
    y = tl.load(y_ptrs, mask=n_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=n_mask)


def _check_token_slots(token_slots: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    if token_slots.dtype != torch.int32 or tuple(token_slots.shape) != (num_tokens,) or token_slots.device != device:
        raise KernelInputError(
            f"`token_slots` should be an int32 tensor of shape ({num_tokens},) on {device}, but got "
            f"{token_slots.dtype} {tuple(token_slots.shape)} on {token_slots.device}"
        )


def bgmv_shrink(x: torch.Tensor, storage: torch.Tensor, a_offsets: torch.Tensor, lora_ranks: torch.Tensor,
                token_slots: torch.Tensor, max_rank: int, cfg: Optional[tuning.LaunchConfig] = None) -> torch.Tensor:
    """Semantics:
      h[i, :r] = x[i] @ A_s.T      for every i with s = token_slots[i] >= 0, r = lora_ranks[s]
      h[i, :]  = 0                 everywhere else
    where A_s [r, in] = storage[a_offsets[s] : a_offsets[s] + r * in] (row-major).
    Args:
      x:           [T, in]
      storage:     1-D, x's dtype; a_offsets: [S] int64; lora_ranks: [S] int32
      token_slots: [T] int32, -1 = no adapter
      max_rank:    >= the rank of every token's slot: h's width
      cfg:         the launch config (default: `tuning`'s for these sizes)
    Returns:
      h: [T, max_rank] float32
    """
    check_shrink_inputs(x, storage, a_offsets, lora_ranks)
    _check_token_slots(token_slots, x.shape[0], x.device)
    h = torch.zeros(x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    if x.shape[0] == 0 or max_rank == 0:
        return h
    cfg = cfg or tuning.bgmv_shrink_config(x.shape[0], max_rank, x.shape[1])
    grid = (x.shape[0], cfg.split_k)
    _bgmv_shrink_kernel[grid](
        x, storage, a_offsets, h, lora_ranks, token_slots,
        x.shape[1],
        x.stride(0), x.stride(1),
        h.stride(0), h.stride(1),
        BLOCK_R=max(cfg.block_r, triton.next_power_of_2(max_rank)), BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h


def bgmv_expand(y: torch.Tensor, h: torch.Tensor, storage: torch.Tensor, b_offsets: torch.Tensor,
                lora_ranks: torch.Tensor, token_slots: torch.Tensor, cfg: Optional[tuning.LaunchConfig] = None) -> None:
    """Semantics:
      y[i] += h[i, :r] @ Bᵀ_s   for every i with s = token_slots[i] >= 0, r = lora_ranks[s]
    where Bᵀ_s [r, out] = storage[b_offsets[s] : b_offsets[s] + r * out] (row-major).
    Args:
      y:           [T, out]  modified in place; tokens of slot -1 are not written
      h:           [T, R] float32, R >= every token's rank
      others as in `bgmv_shrink`
    """
    check_expand_inputs(y, h, storage, b_offsets, lora_ranks)
    _check_token_slots(token_slots, y.shape[0], y.device)
    if y.shape[0] == 0 or h.shape[1] == 0:
        return
    cfg = cfg or tuning.bgmv_expand_config(y.shape[0], h.shape[1], y.shape[1])
    grid = (y.shape[0], triton.cdiv(y.shape[1], cfg.block_n))
    _bgmv_expand_kernel[grid](
        h, storage, b_offsets, y, lora_ranks, token_slots,
        y.shape[1],
        h.stride(0), h.stride(1),
        y.stride(0), y.stride(1),
        BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
