"""wrap() and unwrap(): which layers are patched, what the facade still answers, what is restored."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import multilora_plugin
from multilora_plugin import MultiLoRALinear, toy

from .conftest import padded_batch


def test_all_linear_patches_every_projection_but_the_output_embedding(llama_kit):
    """And the input embedding (LoRA on it, trainable tokens), whose LoRA buffers wait for an adapter;
    both embeddings take adapters' copies of them (`modules_to_save`), around whatever LoRA layer is there."""
    from multilora_plugin.embedding import MultiLoRAEmbedding
    from multilora_plugin.saved import MultiLoRASaved

    model = multilora_plugin.wrap(llama_kit.fresh())
    names = model.patched_modules
    assert len(names) == 2 * 7 + 1 and "lm_head" not in names
    embedding = model.get_submodule("model.embed_tokens")
    assert isinstance(embedding, MultiLoRASaved) and isinstance(embedding.base_layer, MultiLoRAEmbedding)
    assert all(isinstance(model.get_submodule(n), MultiLoRALinear) for n in names if n != "model.embed_tokens")
    assert embedding.base_layer.bank.storage is None and model.memory_stats().slot_buffer_bytes == 0
    assert model.saved_modules == ("model.embed_tokens", "lm_head")
    assert isinstance(model.get_submodule("lm_head").base_layer, torch.nn.Linear)
    assert model.get_output_embeddings().weight is model.get_submodule("lm_head").base_layer.weight
    assert multilora_plugin.wrap(llama_kit.fresh(), modules_to_save=None).saved_modules == ()


@pytest.mark.parametrize("target,expected", [
    (["q_proj", "v_proj"], 4),
    ("model\\.layers\\.1\\.mlp\\..*", 3),
    (["lm_head"], 1),
    (["layers.0.self_attn.o_proj"], 1),
])
def test_target_modules_by_name_suffix_or_regex(llama_kit, target, expected):
    assert len(multilora_plugin.wrap(llama_kit.fresh(), target_modules=target).patched_modules) == expected


def test_slot_buffers_follow_the_base_layer(kit_factory):
    model = multilora_plugin.wrap(kit_factory("gpt2").fresh(), max_loras=3, max_lora_rank=8)
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer.base_layer, Conv1D)
    assert (layer.in_features, layer.out_features, layer.bank.num_slots) == (64, 192, 3)
    assert layer.dtype == layer.base_layer.weight.dtype


def test_facade_behaves_like_the_model(llama_kit):
    hf = llama_kit.fresh()
    model = multilora_plugin.wrap(hf)
    assert model.config is hf.config and model.generation_config is hf.generation_config
    assert model.device == hf.device and model.get_base_model() is hf
    assert model.get_input_embeddings() is hf.get_input_embeddings()
    ids, _ = padded_batch(2, [4, 4])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, llama_kit.base(ids).logits)  # no adapters: exactly the base


def test_unwrap_restores_the_original_modules(llama_kit):
    hf = llama_kit.fresh()
    originals = {n: m for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    keys = set(hf.state_dict())
    model = llama_kit.wrapped()
    model = multilora_plugin.wrap(hf)
    model.load_adapter("a", llama_kit.paths["all4"])
    ids, _ = padded_batch(2, [4, 4])
    with torch.no_grad():
        model(ids, adapter_names=["a", None])
    assert model.unwrap() is hf
    assert {n: m for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)} == originals
    assert set(hf.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, llama_kit.base(ids).logits)
    multilora_plugin.wrap(hf)  # and it can be wrapped again


def test_lora_on_lm_head_when_it_is_wrapped(llama_kit, tmp_path):
    from peft import PeftModel

    path = toy.make_adapter(llama_kit.base, tmp_path / "head", r=4, target_modules=["q_proj", "lm_head"], seed=9)
    model = multilora_plugin.wrap(llama_kit.fresh(), target_modules=["q_proj", "lm_head"])
    model.load_adapter("head", path)
    ids, mask = padded_batch(2, [5, 3])
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_names=["head", None]).logits
        want = PeftModel.from_pretrained(llama_kit.fresh(), path)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
    # generate slices the hidden states to the last position before lm_head; rows still map right
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, adapter_names=["head", None], max_new_tokens=4)
        peft_tokens = PeftModel.from_pretrained(llama_kit.fresh(), path).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert tokens[0].tolist() == peft_tokens[0].tolist()


def test_adapters_report(llama_kit):
    model = llama_kit.wrapped()
    info = model.adapters["regex_pat"]
    assert info.rank == 8 and info.alpha == 16 and info.path == str(llama_kit.paths["regex_pat"])
    assert info.target_modules == ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj")
    # q_proj has rank 2 (rank_pattern); down_proj rank 8: A [r, in] + B [out, r] in fp32
    assert info.num_bytes == 4 * (2 * 64 + 64 * 2 + 8 * 128 + 64 * 8)
    assert model.adapters["mlp16_l1"].target_modules == tuple(
        f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj"))


def test_adapter_takes_a_slot_only_when_used(llama_kit):
    model = llama_kit.wrapped(max_loras=2)
    assert model.slot_contents() == (multilora_plugin.EMPTY,) * 2
    ids, _ = padded_batch(2, [4, 4])
    with torch.no_grad():
        model(ids, adapter_names=["regex_pat", None])
    assert model.slot_contents() == ("regex_pat", multilora_plugin.EMPTY)
