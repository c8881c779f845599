"""A mixed batch gives, per row, what PEFT's PeftModel gives with that row's single adapter."""

from __future__ import annotations

import pytest
import torch

from multilora_plugin import toy

from .conftest import backend_names, padded_batch

ROWS = ["all4", "attn8_rs", None, "mlp16_l1", "regex_pat", "attn8_rs", "__base__"]
LENGTHS = [7, 5, 7, 3, 6, 7, 4]


def _oracle(kit, fn):
    """fn(model) on the whole batch, once per distinct adapter (PEFT) and once for the base model."""
    results = {None: fn(kit.base)}
    for name in {n for n in ROWS if n not in (None, "__base__")}:
        results[name] = fn(kit.peft(name))
    return [results[None if n == "__base__" else n] for n in ROWS]


@pytest.mark.parametrize("backend", backend_names())
@pytest.mark.parametrize("arch", toy.ARCHITECTURES)
def test_logits_match_peft_per_row(kit_factory, arch, backend):
    kit = kit_factory(arch)
    ids, mask = padded_batch(len(ROWS), LENGTHS)
    with torch.no_grad():
        expected = _oracle(kit, lambda m: m(input_ids=ids, attention_mask=mask).logits)
        model = kit.wrapped(max_loras=4, backend=backend)
        got = model(input_ids=ids, attention_mask=mask, adapter_names=ROWS).logits
    for row, (name, want) in enumerate(zip(ROWS, expected)):
        real = mask[row].bool()
        torch.testing.assert_close(got[row][real], want[row][real], atol=1e-4, rtol=0, msg=f"row {row} ({name})")
    base_rows = [i for i, n in enumerate(ROWS) if n in (None, "__base__")]
    for row in base_rows:  # base rows are exactly the base model's output, not just close
        assert torch.equal(got[row], expected[row][row])


@pytest.mark.parametrize("backend", backend_names())
@pytest.mark.parametrize("arch", toy.ARCHITECTURES)
def test_greedy_generate_matches_peft(kit_factory, arch, backend):
    kit = kit_factory(arch)
    ids, mask = padded_batch(len(ROWS), LENGTHS, seed=1)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        expected = _oracle(kit, lambda m: m.generate(**kwargs))
        got = kit.wrapped(max_loras=4, backend=backend).generate(adapter_names=ROWS, **kwargs)
    for row, want in enumerate(expected):
        assert got[row].tolist() == want[row].tolist(), f"row {row} ({ROWS[row]})"


@pytest.mark.parametrize("backend", backend_names())
@pytest.mark.parametrize("arch", toy.ARCHITECTURES)
def test_beam_search_matches_peft(kit_factory, arch, backend):
    kit = kit_factory(arch)
    rows = ["all4", None, "regex_pat"]
    ids, mask = padded_batch(len(rows), [5, 6, 4], seed=2)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=3, num_return_sequences=2,
                  do_sample=False)
    with torch.no_grad():
        got = kit.wrapped(max_loras=4, backend=backend).generate(adapter_names=rows, **kwargs)
        for row, name in enumerate(rows):
            oracle = kit.base if name is None else kit.peft(name)
            want = oracle.generate(**kwargs)
            assert got[2 * row: 2 * row + 2].tolist() == want[2 * row: 2 * row + 2].tolist(), f"row {row} ({name})"


def test_sampling_with_returned_sequences_uses_each_rows_adapter(llama_kit):
    """num_return_sequences expands each row into 3; every copy keeps its row's adapter.

    Sampling shares one random stream across rows, so top_k=1 keeps the sampling path deterministic.
    """
    rows = ["attn8_rs", None]
    ids, mask = padded_batch(2, [5, 5], seed=3)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=1,
                  num_return_sequences=3)
    with torch.no_grad():
        got = llama_kit.wrapped().generate(adapter_names=rows, **kwargs)
        peft_out = llama_kit.peft("attn8_rs").generate(**kwargs)
        base_out = llama_kit.base.generate(**kwargs)
    assert got.shape[0] == 6
    assert got[:3].tolist() == peft_out[:3].tolist()
    assert got[3:].tolist() == base_out[3:].tolist()
    assert got[0].tolist() != got[3].tolist()  # the adapter really changed row 0


def test_bin_checkpoints_load_like_safetensors(llama_kit, tmp_path):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(llama_kit.fresh(), llama_kit.paths["all4"])
    peft_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    model = llama_kit.wrapped()
    model.load_adapter("all4_bin", tmp_path / "bin")
    ids, _ = padded_batch(2, [5, 5])
    with torch.no_grad():
        out = model(ids, adapter_names=["all4", "all4_bin"]).logits
        alone = model(ids[1:], adapter_names=["all4"]).logits
    torch.testing.assert_close(out[1], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_models_reproduce_the_peft_delta(llama_kit, dtype, bound):
    """Slot buffers take the model's dtype; the delta matches PEFT's to within half-precision rounding."""
    import multilora_plugin
    from peft import PeftModel

    base = llama_kit.fresh().to(dtype)
    model = multilora_plugin.wrap(base, max_loras=2)
    model.load_adapter("all4", llama_kit.paths["all4"])
    assert model.get_submodule("model.layers.0.mlp.up_proj").dtype == dtype
    ids, mask = padded_batch(2, [6, 4], seed=5)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_names=["all4", None]).logits.float()
        plain = llama_kit.fresh().to(dtype)
        base_logits = plain(input_ids=ids, attention_mask=mask).logits.float()
        peft_logits = PeftModel.from_pretrained(plain, llama_kit.paths["all4"])(
            input_ids=ids, attention_mask=mask).logits.float()
    real = mask[0].bool()
    delta = (peft_logits[0] - base_logits[0])[real]
    error = (got[0] - peft_logits[0])[real]
    assert error.norm() < bound * delta.norm()  # measured: 1.5% (bf16), 0.16% (fp16)
    assert torch.equal(got[1], base_logits[1])
