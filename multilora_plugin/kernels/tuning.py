"""Launch configurations of the Triton kernels, kept apart from the kernels themselves.

Each function maps the sizes of one launch to block sizes and warps. The defaults are sound for
Hopper-class GPUs and any size. Tuned values belong here, measured with `benchmarks/bench_kernels.py`.
`tl.dot` needs every block dimension to be at least 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int = 16  # tokens per program (SGMV)
    block_n: int = 64  # output features per program (expand)
    block_k: int = 64  # input features per loop step (shrink)
    block_r: int = 16  # rank per loop step (expand) or the whole padded rank (shrink)
    split_k: int = 1  # programs that share one token's reduction (BGMV shrink)
    num_warps: int = 4


def _rank_block(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))


def _token_block(max_segment_len: int) -> int:
    return min(64, max(16, triton.next_power_of_2(max_segment_len)))


def sgmv_shrink_config(max_segment_len: int, max_rank: int, in_features: int) -> LaunchConfig:
    return LaunchConfig(block_m=_token_block(max_segment_len), block_k=64 if in_features >= 64 else 32,
                        block_r=_rank_block(max_rank))


def sgmv_expand_config(max_segment_len: int, max_rank: int, out_features: int) -> LaunchConfig:
    return LaunchConfig(block_m=_token_block(max_segment_len), block_n=128 if out_features >= 2048 else 64,
                        block_r=16)


def bgmv_shrink_config(num_tokens: int, max_rank: int, in_features: int) -> LaunchConfig:
    block_k = 256 if in_features >= 256 else 64
    steps = triton.cdiv(in_features, block_k)
    # few tokens cannot fill the GPU: let several programs share each token's reduction
    split_k = max(1, min(steps, 256 // max(1, num_tokens)))
    return LaunchConfig(block_k=block_k, block_r=_rank_block(max_rank), split_k=split_k)


def bgmv_expand_config(num_tokens: int, max_rank: int, out_features: int) -> LaunchConfig:
    return LaunchConfig(block_n=256 if out_features >= 4096 else 128, block_r=16)
