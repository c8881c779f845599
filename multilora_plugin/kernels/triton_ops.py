"""The Triton backend: the SGMV / BGMV kernels registered as torch custom ops.

Registering them with `torch.library.custom_op` (each with a fake implementation that only describes
its output) lets `torch.compile` trace through a decode step and CUDA graphs capture one. Importing
this module registers the ops under the `multilora` namespace: `torch.ops.multilora.sgmv_shrink`, ...
"""

from __future__ import annotations

import torch

from ..mapping import TokenMapping
from .bank import SlotBank
from .triton_bgmv import bgmv_expand, bgmv_shrink
from .triton_sgmv import sgmv_expand, sgmv_shrink

_Tensor = torch.Tensor


@torch.library.custom_op("multilora::sgmv_shrink", mutates_args=())
def _sgmv_shrink_op(x: _Tensor, storage: _Tensor, a_offsets: _Tensor, lora_ranks: _Tensor, index: _Tensor,
                    seg_slots: _Tensor, seg_starts: _Tensor, seg_lens: _Tensor, max_segment_len: int,
                    max_rank: int) -> _Tensor:
    return sgmv_shrink(x, storage, a_offsets, lora_ranks, index, seg_slots, seg_starts, seg_lens, max_segment_len,
                       max_rank)


@_sgmv_shrink_op.register_fake
def _(x, storage, a_offsets, lora_ranks, index, seg_slots, seg_starts, seg_lens, max_segment_len, max_rank):
    return x.new_empty((x.shape[0], max_rank), dtype=torch.float32)


@torch.library.custom_op("multilora::sgmv_expand", mutates_args=("y",))
def _sgmv_expand_op(y: _Tensor, h: _Tensor, storage: _Tensor, b_offsets: _Tensor, lora_ranks: _Tensor,
                    index: _Tensor, seg_slots: _Tensor, seg_starts: _Tensor, seg_lens: _Tensor,
                    max_segment_len: int) -> None:
    sgmv_expand(y, h, storage, b_offsets, lora_ranks, index, seg_slots, seg_starts, seg_lens, max_segment_len)


@_sgmv_expand_op.register_fake
def _(y, h, storage, b_offsets, lora_ranks, index, seg_slots, seg_starts, seg_lens, max_segment_len):
    return None


@torch.library.custom_op("multilora::bgmv_shrink", mutates_args=())
def _bgmv_shrink_op(x: _Tensor, storage: _Tensor, a_offsets: _Tensor, lora_ranks: _Tensor, token_slots: _Tensor,
                    max_rank: int) -> _Tensor:
    return bgmv_shrink(x, storage, a_offsets, lora_ranks, token_slots, max_rank)


@_bgmv_shrink_op.register_fake
def _(x, storage, a_offsets, lora_ranks, token_slots, max_rank):
    return x.new_empty((x.shape[0], max_rank), dtype=torch.float32)


@torch.library.custom_op("multilora::bgmv_expand", mutates_args=("y",))
def _bgmv_expand_op(y: _Tensor, h: _Tensor, storage: _Tensor, b_offsets: _Tensor, lora_ranks: _Tensor,
                    token_slots: _Tensor) -> None:
    bgmv_expand(y, h, storage, b_offsets, lora_ranks, token_slots)


@_bgmv_expand_op.register_fake
def _(y, h, storage, b_offsets, lora_ranks, token_slots):
    return None


class TritonBackend:
    """LoRA ops as Triton kernels: BGMV for decode steps (one token per row), SGMV otherwise."""

    name = "triton"

    def lora_shrink(self, x: _Tensor, bank: SlotBank, tokens: TokenMapping) -> _Tensor:
        """Semantics: as `TorchBackend.lora_shrink`; h: [T, R] float32, R the batch's largest rank."""
        max_rank = bank.max_rank(s for s, _, _ in tokens.segments)
        if tokens.kind == "bgmv":
            return torch.ops.multilora.bgmv_shrink(x, bank.storage, bank.a_offsets, bank.ranks, tokens.token_slots,
                                                   max_rank)
        return torch.ops.multilora.sgmv_shrink(x, bank.storage, bank.a_offsets, bank.ranks, tokens.index,
                                               tokens.seg_slots, tokens.seg_starts, tokens.seg_lens,
                                               tokens.max_segment_len, max_rank)

    def lora_expand(self, y: _Tensor, h: _Tensor, bank: SlotBank, tokens: TokenMapping) -> None:
        """Semantics: as `TorchBackend.lora_expand`; y modified in place."""
        if tokens.kind == "bgmv":
            torch.ops.multilora.bgmv_expand(y, h, bank.storage, bank.b_offsets, bank.ranks, tokens.token_slots)
        else:
            torch.ops.multilora.sgmv_expand(y, h, bank.storage, bank.b_offsets, bank.ranks, tokens.index,
                                            tokens.seg_slots, tokens.seg_starts, tokens.seg_lens,
                                            tokens.max_segment_len)

    def add_lora(self, y: _Tensor, x: _Tensor, bank: SlotBank, tokens: TokenMapping) -> None:
        """Semantics:
          y[i] += x[i] @ A_s.T @ Bᵀ_s      for every token i with slot s >= 0
        Shapes as in `TorchBackend.add_lora`; the fp32 intermediate h is [T, R]. The kernels read the
        ranks and offsets on the device.
        """
        if bank.storage is None or not any(bank.host_ranks[s] for s, _, _ in tokens.segments):
            return
        self.lora_expand(y, self.lora_shrink(x, bank, tokens), bank, tokens)
