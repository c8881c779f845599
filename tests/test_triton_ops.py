"""The Triton ops as torch custom ops: schemas and fake implementations, torch.compile, CUDA graphs.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py); the CUDA-graph test needs a GPU.
"""

from __future__ import annotations

import pytest
import torch

from multilora_plugin import BatchMapping, KernelInputError
from multilora_plugin.kernels import SlotBank, add_lora_reference

from .conftest import TRITON_MISSING

pytestmark = pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def weights(num_slots=3, rank=16, d_in=32, d_out=48, ranks=(4, 16, 0), seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(num_slots, rank, d_in)
    b = torch.zeros(num_slots, d_out, rank)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, d_in, generator=g) / d_in ** 0.5
        b[s, :, :r] = torch.randn(d_out, r, generator=g) / r ** 0.5
    return a.to(DEVICE), b.to(DEVICE), torch.tensor(ranks, dtype=torch.int32, device=DEVICE)


def op_args(row_slots=(1, -1, 0, 1, 2), per_row=1):
    import multilora_plugin.kernels.triton_ops  # noqa: F401  registers torch.ops.multilora.*

    a, b, ranks = weights()
    t = len(row_slots) * per_row
    x = torch.randn(t, a.shape[2], device=DEVICE)
    y = torch.randn(t, b.shape[1], device=DEVICE)
    tokens = BatchMapping(row_slots, a.shape[0]).tokens(t, torch.device(DEVICE))
    return x, y, a, b, ranks, tokens, SlotBank.from_padded(a, b, ranks)


@pytest.mark.parametrize("per_row", [1, 3])
def test_opcheck(per_row):
    x, y, a, b, ranks, tokens, bank = op_args(per_row=per_row)
    ops = torch.ops.multilora
    segs = (tokens.index, tokens.seg_slots, tokens.seg_starts, tokens.seg_lens, tokens.max_segment_len)
    shrink, expand = (bank.storage, bank.a_offsets, bank.ranks), (bank.storage, bank.b_offsets, bank.ranks)
    h = ops.sgmv_shrink(x, *shrink, *segs, 16)
    torch.library.opcheck(ops.sgmv_shrink.default, (x, *shrink, *segs, 16))
    torch.library.opcheck(ops.sgmv_expand.default, (y.clone(), h, *expand, *segs))
    torch.library.opcheck(ops.bgmv_shrink.default, (x, *shrink, tokens.token_slots, 16))
    torch.library.opcheck(ops.bgmv_expand.default, (y.clone(), h, *expand, tokens.token_slots))


def test_a_decode_step_compiles_without_graph_breaks():
    x, y, a, b, ranks, tokens, bank = op_args()

    def step(y, x, token_slots):
        h = torch.ops.multilora.bgmv_shrink(x, bank.storage, bank.a_offsets, bank.ranks, token_slots, 16)
        torch.ops.multilora.bgmv_expand(y, h, bank.storage, bank.b_offsets, bank.ranks, token_slots)
        return y

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    want = y.clone()
    add_lora_reference(want, x, a, b, ranks, tokens.token_slots)
    got = compiled(y.clone(), x, tokens.token_slots)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_wrappers_refuse_bad_inputs():
    from multilora_plugin.kernels.triton_bgmv import bgmv_shrink
    from multilora_plugin.kernels.triton_sgmv import sgmv_expand

    x, y, a, b, ranks, tokens, bank = op_args()
    w, offsets = bank.storage, bank.a_offsets
    with pytest.raises(KernelInputError, match=r"expected x \[T, in\] and a 1-D weight storage"):
        bgmv_shrink(x[0], w, offsets, ranks, tokens.token_slots, 16)
    with pytest.raises(KernelInputError, match="`token_slots` should be an int32 tensor of shape"):
        bgmv_shrink(x, w, offsets, ranks, tokens.token_slots.long(), 16)
    with pytest.raises(KernelInputError, match="`lora_ranks` should be an int32 tensor of shape"):
        bgmv_shrink(x, w, offsets, ranks[:2], tokens.token_slots, 16)
    with pytest.raises(KernelInputError, match="slot offsets should be a 1-D int64 tensor"):
        bgmv_shrink(x, w, offsets.int(), ranks, tokens.token_slots, 16)
    with pytest.raises(KernelInputError, match="should share one of"):
        bgmv_shrink(x.double(), w, offsets, ranks, tokens.token_slots, 16)
    with pytest.raises(KernelInputError, match="h should be float32"):
        sgmv_expand(y, torch.zeros(y.shape[0], 16, dtype=torch.float16, device=DEVICE), w, bank.b_offsets, ranks,
                    tokens.index, tokens.seg_slots, tokens.seg_starts, tokens.seg_lens, tokens.max_segment_len)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_captures_and_replays_a_decode_step():
    """Capture one patched layer's decode step, then replay it on new inputs."""
    import multilora_plugin
    from multilora_plugin.layers import MultiLoRALinear
    from multilora_plugin.mapping import ForwardContext

    torch.manual_seed(0)
    a, b, ranks = weights()
    context = ForwardContext()
    base = torch.nn.Linear(a.shape[2], b.shape[1], device="cuda")
    layer = MultiLoRALinear(base, a.shape[0], context, multilora_plugin.kernels.select_backend("triton", "cuda"))
    layer.bank = SlotBank.from_padded(a, b, ranks)
    context.mapping = BatchMapping((1, -1, 0, 1, 2, 2, 0, -1), a.shape[0])
    x = torch.randn(8, 1, a.shape[2], device="cuda")
    with torch.no_grad():
        layer(x)  # warm up: compiles kernels and builds the token mapping outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)
