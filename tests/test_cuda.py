"""On a GPU only (`pytest -m cuda`, run first by benchmarks/gpu/run.py): the Triton kernels against the
reference in bf16 and fp16 at Punica's shapes, and a mixed batch against PEFT with the model on CUDA.

The CUDA-graph capture of a decode step (test_triton_ops.py) and the pinned-memory slot copies on the
side stream (test_lifecycle.py) carry the same marker.
"""

from __future__ import annotations

import pytest
import torch

from multilora_plugin import BatchMapping
from multilora_plugin.kernels import SlotBank, add_lora_reference

from .conftest import TRITON_MISSING, padded_batch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed")]

PUNICA_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]


def slot_weights(num_slots: int, rank: int, d_in: int, d_out: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(num_slots, rank, d_in, device="cuda", generator=g) / d_in ** 0.5
    b = torch.randn(num_slots, d_out, rank, device="cuda", generator=g) / rank ** 0.5
    ranks = torch.full((num_slots,), rank, dtype=torch.int32, device="cuda")
    ranks[-1] = rank // 2  # one slot holds a smaller adapter: the kernels must stop at its rank
    a[-1, rank // 2:] = 0
    b[-1, :, rank // 2:] = 0
    return a.to(dtype), b.to(dtype), ranks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", PUNICA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("rows,tokens_per_row", [(1, 1), (7, 1), (64, 1), (4, 33), (3, 128)],
                         ids=["decode1", "decode7", "decode64", "prefill4x33", "prefill3x128"])
def test_triton_matches_the_reference_at_punica_shapes(dtype, shape, rank, rows, tokens_per_row):
    from multilora_plugin.kernels.triton_ops import TritonBackend

    d_in, d_out = shape
    num_slots = 8
    a, b, ranks = slot_weights(num_slots, rank, d_in, d_out, dtype)
    row_slots = tuple((i * 5 + 1) % (num_slots + 1) - 1 for i in range(rows))  # every slot, unsorted; -1 at 64 rows
    mapping = BatchMapping(row_slots, num_slots).tokens(rows * tokens_per_row, torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(rows * tokens_per_row, d_in, device="cuda", generator=g).to(dtype)
    y = torch.randn(rows * tokens_per_row, d_out, device="cuda", generator=g).to(dtype)
    expected = y.float().clone()
    add_lora_reference(expected, x.float(), a.float(), b.float(), ranks, mapping.token_slots)
    got = y.clone()
    TritonBackend().add_lora(got, x, SlotBank.from_padded(a, b, ranks), mapping)
    base_rows = [i for i, s in enumerate(row_slots) if s < 0]
    for row in base_rows:  # rows without an adapter are never written
        part = slice(row * tokens_per_row, (row + 1) * tokens_per_row)
        assert torch.equal(got[part], y[part])
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=5e-2)  # bf16/fp16 in, fp32 accumulation


def test_a_mixed_batch_on_cuda_equals_peft_for_every_row(llama_kit):
    """Rows of three adapters and the base model in one forward (Triton kernels, fp32 on CUDA) give
    each row what PEFT gives with that row's adapter alone; greedy generation agrees token for token."""
    import multilora_plugin

    names = ["all4", None, "attn8_rs", "mlp16_l1", None, "all4"]
    model = multilora_plugin.wrap(llama_kit.fresh().cuda(), max_loras=3, backend="triton")
    for name in {n for n in names if n}:
        model.load_adapter(name, llama_kit.paths[name])
    ids, mask = padded_batch(len(names), [5, 9, 3, 9, 7, 6])
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=6,
                             do_sample=False)
    for row, name in enumerate(names):
        reference = llama_kit.fresh().cuda().eval() if name is None else llama_kit.peft(name).cuda()
        with torch.no_grad():
            want = reference(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
            want_out = reference.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                                          max_new_tokens=6, do_sample=False)
        torch.testing.assert_close(logits[row:row + 1], want, rtol=1e-4, atol=1e-4)
        assert out[row].tolist() == want_out[0].tolist(), (row, name)


def test_moe_expert_adapters_on_cuda_equal_peft_for_every_row(tmp_path):
    """LoRA on fused experts and the router (Triton kernels over the (adapter, expert) virtual slots)
    mixed with a plain adapter and base rows: each row equals PEFT alone with its adapter. In fp32: in
    bf16 a router's near-tie may pick another expert on either side, a discrete change of the output."""
    import copy

    from multilora_plugin import toy

    from .oracle import Case
    from .test_moe import ROWS, specs

    base = toy.tiny_model("mixtral", hidden_size=64)
    paths = {name: toy.make_adapter(base, tmp_path / name, **spec) for name, spec in specs("mixtral").items()}
    Case(lambda: copy.deepcopy(base).cuda(), paths).check_mixed_forward(ROWS, backend="triton")
