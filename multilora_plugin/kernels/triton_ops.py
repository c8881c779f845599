"""The Triton backend: the SGMV / BGMV kernels registered as torch custom ops.

Registering them with `torch.library.custom_op` (each with a fake implementation that only describes
its output) lets `torch.compile` trace through a decode step and CUDA graphs capture one. Importing
this module registers the ops under the `multilora` namespace: `torch.ops.multilora.sgmv_shrink`, ...
"""

from __future__ import annotations

import torch

from ..mapping import TokenMapping
from .triton_bgmv import bgmv_expand, bgmv_shrink
from .triton_sgmv import sgmv_expand, sgmv_shrink

_Tensor = torch.Tensor


@torch.library.custom_op("multilora::sgmv_shrink", mutates_args=())
def _sgmv_shrink_op(x: _Tensor, lora_a: _Tensor, lora_ranks: _Tensor, index: _Tensor, seg_slots: _Tensor,
                    seg_starts: _Tensor, seg_lens: _Tensor, max_segment_len: int) -> _Tensor:
    return sgmv_shrink(x, lora_a, lora_ranks, index, seg_slots, seg_starts, seg_lens, max_segment_len)


@_sgmv_shrink_op.register_fake
def _(x, lora_a, lora_ranks, index, seg_slots, seg_starts, seg_lens, max_segment_len):
    return x.new_empty((x.shape[0], lora_a.shape[1]), dtype=torch.float32)


@torch.library.custom_op("multilora::sgmv_expand", mutates_args=("y",))
def _sgmv_expand_op(y: _Tensor, h: _Tensor, lora_b: _Tensor, lora_ranks: _Tensor, index: _Tensor,
                    seg_slots: _Tensor, seg_starts: _Tensor, seg_lens: _Tensor, max_segment_len: int) -> None:
    sgmv_expand(y, h, lora_b, lora_ranks, index, seg_slots, seg_starts, seg_lens, max_segment_len)


@_sgmv_expand_op.register_fake
def _(y, h, lora_b, lora_ranks, index, seg_slots, seg_starts, seg_lens, max_segment_len):
    return None


@torch.library.custom_op("multilora::bgmv_shrink", mutates_args=())
def _bgmv_shrink_op(x: _Tensor, lora_a: _Tensor, lora_ranks: _Tensor, token_slots: _Tensor) -> _Tensor:
    return bgmv_shrink(x, lora_a, lora_ranks, token_slots)


@_bgmv_shrink_op.register_fake
def _(x, lora_a, lora_ranks, token_slots):
    return x.new_empty((x.shape[0], lora_a.shape[1]), dtype=torch.float32)


@torch.library.custom_op("multilora::bgmv_expand", mutates_args=("y",))
def _bgmv_expand_op(y: _Tensor, h: _Tensor, lora_b: _Tensor, lora_ranks: _Tensor, token_slots: _Tensor) -> None:
    bgmv_expand(y, h, lora_b, lora_ranks, token_slots)


@_bgmv_expand_op.register_fake
def _(y, h, lora_b, lora_ranks, token_slots):
    return None


class TritonBackend:
    """LoRA ops as Triton kernels: BGMV for decode steps (one token per row), SGMV otherwise."""

    name = "triton"

    def lora_shrink(self, x: _Tensor, lora_a: _Tensor, lora_ranks: _Tensor, tokens: TokenMapping) -> _Tensor:
        """Semantics: as `TorchBackend.lora_shrink`; h: [T, R] float32."""
        if tokens.kind == "bgmv":
            return torch.ops.multilora.bgmv_shrink(x, lora_a, lora_ranks, tokens.token_slots)
        return torch.ops.multilora.sgmv_shrink(x, lora_a, lora_ranks, tokens.index, tokens.seg_slots,
                                               tokens.seg_starts, tokens.seg_lens, tokens.max_segment_len)

    def lora_expand(self, y: _Tensor, h: _Tensor, lora_b: _Tensor, lora_ranks: _Tensor, tokens: TokenMapping) -> None:
        """Semantics: as `TorchBackend.lora_expand`; y modified in place."""
        if tokens.kind == "bgmv":
            torch.ops.multilora.bgmv_expand(y, h, lora_b, lora_ranks, tokens.token_slots)
        else:
            torch.ops.multilora.sgmv_expand(y, h, lora_b, lora_ranks, tokens.index, tokens.seg_slots,
                                            tokens.seg_starts, tokens.seg_lens, tokens.max_segment_len)

    def add_lora(self, y: _Tensor, x: _Tensor, lora_a: _Tensor, lora_b: _Tensor, lora_ranks: _Tensor,
                 tokens: TokenMapping, host_ranks=None) -> None:
        """Semantics:
          y[i] += x[i] @ lora_a[s].T @ lora_b[s].T      for every token i with slot s >= 0
        Shapes as in `TorchBackend.add_lora`; the fp32 intermediate h is [T, R]. The kernels read the
        ranks on the device (`host_ranks` is not needed).
        """
        if not tokens.segments:
            return
        self.lora_expand(y, self.lora_shrink(x, lora_a, lora_ranks, tokens), lora_b, lora_ranks, tokens)
