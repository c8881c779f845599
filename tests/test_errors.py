"""Every bad input a user will hit gets a typed error that says what was expected and what was found,
and a failed load leaves the model and every other adapter exactly as before."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import multilora_plugin
from multilora_plugin import (AdapterExistsError, AdapterLoadError, AdapterNotFoundError, CapacityError,
                              ConfigError, IncompatibleAdapterError, InvalidRequestError, MultiLoRAError,
                              WrapError, toy)

from .conftest import padded_batch

WEIGHTS = "adapter_model.safetensors"


def copy_of(kit, tmp_path, name="attn8_rs"):
    dst = tmp_path / "adapter"
    shutil.copytree(kit.paths[name], dst)
    return dst


def edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_weights(path, fn):
    tensors = load_file(path / WEIGHTS)
    save_file(fn(tensors), path / WEIGHTS)


def first_key(tensors, part="lora_A"):
    return next(k for k in sorted(tensors) if part in k)


def missing_dir(kit, tmp_path):
    return tmp_path / "nope"


def no_config(kit, tmp_path):
    path = copy_of(kit, tmp_path)
    (path / "adapter_config.json").unlink()
    return path


def invalid_json(kit, tmp_path):
    path = copy_of(kit, tmp_path)
    (path / "adapter_config.json").write_text("{not json")
    return path


def unknown_peft_type(kit, tmp_path):
    path = copy_of(kit, tmp_path)
    edit_config(path, peft_type="NOT_A_METHOD")
    return path


def no_weights(kit, tmp_path):
    path = copy_of(kit, tmp_path)
    (path / WEIGHTS).unlink()
    return path


def corrupt_weights(kit, tmp_path):
    path = copy_of(kit, tmp_path)
    (path / WEIGHTS).write_bytes(b"\x00garbage" * 10)
    return path


def ia3_adapter(kit, tmp_path):
    from peft import IA3Config, get_peft_model

    model = get_peft_model(kit.fresh(), IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    return tmp_path / "ia3"


def copy_not_served(kit, tmp_path):  # lm_head, embed_tokens and score copies are served (test_saved.py)
    # "input_layernorm", not "norm": PEFT 0.21 copies every module whose name ends with an entry, 0.22 only
    # those whose last name component is one, so "norm" would copy model.norm alone there
    return toy.make_adapter(kit.base, tmp_path / "mts", r=4, target_modules=["q_proj"],
                            modules_to_save=["input_layernorm"])


def trained_bias(kit, tmp_path):
    return toy.make_adapter(kit.base, tmp_path / "bias", r=4, target_modules=["q_proj"], bias="all")


def lora_on_unwrapped_embedding(kit, tmp_path):  # served where the embedding is wrapped (test_variants.py)
    return toy.make_adapter(kit.base, tmp_path / "emb", r=4, target_modules=["q_proj", "embed_tokens"])


def lora_on_lm_head(kit, tmp_path):
    return toy.make_adapter(kit.base, tmp_path / "head", r=4, target_modules=["q_proj", "lm_head"])


def unknown_module(kit, tmp_path):
    path = copy_of(kit, tmp_path)
    edit_weights(path, lambda t: {k.replace("q_proj", "qq_proj"): v for k, v in t.items()})
    return path


def module_not_wrapped(kit, tmp_path):  # the model in this table is wrapped without up_proj
    return toy.make_adapter(kit.base, tmp_path / "up", r=4, target_modules=["q_proj", "up_proj"])


def other_base_model(kit, tmp_path):
    return toy.make_adapter(toy.tiny_model("llama", hidden_size=32), tmp_path / "small", r=4)


def rank_too_high(kit, tmp_path):
    return toy.make_adapter(kit.base, tmp_path / "r32", r=32, target_modules=["q_proj"])


def rank_disagrees_with_config(kit, tmp_path):
    path = copy_of(kit, tmp_path)
    edit_config(path, r=2)
    return path


def missing_lora_b(kit, tmp_path):
    path = copy_of(kit, tmp_path)
    edit_weights(path, lambda t: {k: v for k, v in t.items() if k != first_key(t, "lora_B")})
    return path


def nan_weights(kit, tmp_path):
    path = copy_of(kit, tmp_path)

    def poison(t):
        t[first_key(t)][0, 0] = float("nan")
        return t

    edit_weights(path, poison)
    return path


def inf_weights(kit, tmp_path):
    path = copy_of(kit, tmp_path)

    def poison(t):
        t[first_key(t, "lora_B")][1, 0] = float("inf")
        return t

    edit_weights(path, poison)
    return path


# (bad adapter, error type, words the message must contain)
BAD_ADAPTERS = [
    (missing_dir, AdapterLoadError, "is not a directory"),
    (no_config, AdapterLoadError, "expected adapter_config.json"),
    (invalid_json, AdapterLoadError, "not a valid PEFT adapter config"),
    (unknown_peft_type, AdapterLoadError, "not a valid PEFT adapter config"),
    (no_weights, AdapterLoadError, "adapter_model.safetensors or adapter_model.bin"),
    (corrupt_weights, AdapterLoadError, "could not read the adapter weights"),
    (ia3_adapter, IncompatibleAdapterError, "expected a LoRA adapter (peft_type 'LORA')"),
    (copy_not_served, IncompatibleAdapterError, "copy of 'model.layers.0.input_layernorm' (`modules_to_save`), but"),
    (trained_bias, IncompatibleAdapterError, "trained biases"),
    (lora_on_unwrapped_embedding, IncompatibleAdapterError, "'model.embed_tokens', but that module was not wrapped"),
    (lora_on_lm_head, IncompatibleAdapterError, "'lm_head', but it is the output embedding"),
    (unknown_module, IncompatibleAdapterError, "the model has no module of that name"),
    (module_not_wrapped, IncompatibleAdapterError, "that module was not wrapped"),
    (other_base_model, IncompatibleAdapterError, "(was the adapter trained on another base model?)"),
    (rank_too_high, IncompatibleAdapterError, "rank 32 is above max_lora_rank=16"),
    (rank_disagrees_with_config, AdapterLoadError, "the config gives rank 2, but the weights have rank 8"),
    (missing_lora_b, AdapterLoadError, "has no lora_B weight"),
    (nan_weights, AdapterLoadError, "NaN or Inf"),
    (inf_weights, AdapterLoadError, "NaN or Inf"),
]

PROJECTIONS_BUT_UP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def served(llama_kit, tmp_path_factory):
    """A model serving two adapters, and its output before anything goes wrong."""
    from peft import PeftModel

    # "mlp16_l1" targets up_proj, so serve a q/k/v adapter and an attention-only one instead
    peft_model = PeftModel.from_pretrained(llama_kit.fresh(), llama_kit.paths["attn8_rs"])
    model = multilora_plugin.wrap(llama_kit.fresh(), max_loras=2, max_lora_rank=16, target_modules=PROJECTIONS_BUT_UP)
    model.load_adapter("attn", llama_kit.paths["attn8_rs"])
    model.load_adapter("regex", llama_kit.paths["regex_pat"])
    ids, _ = padded_batch(3, [5, 5, 5])
    with torch.no_grad():
        before = model(ids, adapter_names=["attn", None, "regex"]).logits
        torch.testing.assert_close(before[0], peft_model(ids[:1]).logits[0], atol=1e-4, rtol=0)
    return model, ids, before


@pytest.mark.parametrize("make,error,words", BAD_ADAPTERS, ids=[m.__name__ for m, _, _ in BAD_ADAPTERS])
def test_bad_adapter_is_refused_and_changes_nothing(served, llama_kit, tmp_path, make, error, words):
    model, ids, before = served
    adapters, slots = model.adapters, model.slot_contents()
    path = make(llama_kit, tmp_path)
    with pytest.raises(error) as info:
        model.load_adapter("bad", path)
    assert isinstance(info.value, MultiLoRAError)
    assert words in str(info.value)
    assert model.adapters == adapters and model.slot_contents() == slots
    with torch.no_grad():
        after = model(ids, adapter_names=["attn", None, "regex"]).logits
    assert torch.equal(after, before)


def test_duplicate_name(served, llama_kit):
    model, _, _ = served
    with pytest.raises(AdapterExistsError, match="an adapter named 'attn' is already registered"):
        model.load_adapter("attn", llama_kit.paths["attn8_rs"])


@pytest.mark.parametrize("name", ["", "__base__", None, 3])
def test_bad_adapter_names_on_load(served, llama_kit, name):
    with pytest.raises(InvalidRequestError, match="an adapter name should be a non-empty str"):
        served[0].load_adapter(name, llama_kit.paths["attn8_rs"])


# (adapter_names for a batch of 3 rows, error type, words)
BAD_REQUESTS = [
    (["attn", None], InvalidRequestError, "one entry per input row (3), but has 2"),
    (["attn", "nope", None], AdapterNotFoundError, "adapter 'nope' is not registered (2 registered: 'attn', 'regex')"),
    ("attn", InvalidRequestError, "should be a list with one name (or None) per row"),
    (["attn", 7, None], InvalidRequestError, "adapter names should be str or None, but got 7"),
]


@pytest.mark.parametrize("names,error,words", BAD_REQUESTS)
def test_bad_requests(served, names, error, words):
    model, ids, before = served
    with pytest.raises(error) as info:
        model(ids, adapter_names=names)
    assert words in str(info.value)
    with torch.no_grad():  # the failed call left no mapping behind
        assert torch.equal(model(ids, adapter_names=["attn", None, "regex"]).logits, before)
        assert torch.equal(model(ids).logits[1], before[1])


def test_more_adapters_than_slots(llama_kit):
    model = llama_kit.wrapped(max_loras=2)
    ids, _ = padded_batch(3, [4, 4, 4])
    with pytest.raises(CapacityError, match=r"needs 3 distinct adapters at once, but there are only 2 slots"):
        model(ids, adapter_names=["all4", "attn8_rs", "regex_pat"])
    with pytest.raises(CapacityError):
        model.generate(ids, adapter_names=["all4", "attn8_rs", "regex_pat"], max_new_tokens=2)


def test_generate_names_per_row(served):
    model, ids, _ = served
    with pytest.raises(InvalidRequestError, match=r"one entry per input row \(3\), but has 1"):
        model.generate(ids, adapter_names=["attn"], max_new_tokens=2)


def test_swapped_name_and_path_get_a_hint(served, llama_kit):
    with pytest.raises(InvalidRequestError, match=r"adapters are given as \(name, path\)"):
        served[0].load_adapter(str(llama_kit.paths["all4"]), "all4")


def test_unload_unknown(served):
    with pytest.raises(AdapterNotFoundError, match="adapter 'ghost' is not registered"):
        served[0].unload_adapter("ghost")


@pytest.mark.parametrize("kwargs,words", [
    (dict(max_loras=0), "`max_loras` should be an int >= 1, but got 0"),
    (dict(max_lora_rank=-2), "`max_lora_rank` should be an int >= 1, but got -2"),
    (dict(backend="cuda"), "`backend` should be one of"),
    (dict(backend="triton"), "backend 'triton' needs a CUDA model, but the model is on cpu"),
    (dict(target_modules="(["), "does not compile"),
    (dict(target_modules=[]), "non-empty list of module names"),
    (dict(max_loras=4, max_cpu_loras=2), "`max_cpu_loras` should be an int >= max_loras (4), as every adapter "
                                         "in a slot keeps its CPU copy, but got 2"),
    (dict(max_cpu_loras=True), "`max_cpu_loras` should be an int >= the number of slots (256)"),
    (dict(lora_memory="2 parsecs"), "`lora_memory` should be a number of bytes or a size such as '2GiB'"),
    (dict(lora_memory=0), "`lora_memory` should be more than 0 bytes, but got 0"),
])
def test_bad_wrap_settings(llama_kit, monkeypatch, kwargs, words):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError) as info:
        multilora_plugin.wrap(llama_kit.fresh(), **kwargs)
    assert words in str(info.value)


def test_wrap_errors(llama_kit):
    model = multilora_plugin.wrap(llama_kit.fresh())
    with pytest.raises(WrapError, match="already wrapped"):
        multilora_plugin.wrap(model)
    with pytest.raises(WrapError, match="already wrapped"):
        multilora_plugin.wrap(model.hf_model)
    with pytest.raises(WrapError, match="expected a torch nn.Module"):
        multilora_plugin.wrap("llama")
    with pytest.raises(WrapError, match="no nn.Linear or Conv1D module matched"):
        multilora_plugin.wrap(llama_kit.fresh(), target_modules=["nothing_here"])
    with pytest.raises(WrapError, match="got a PEFT model"):  # wrap() takes PeftModels apart; the class does not
        multilora_plugin.MultiLoRAModel(llama_kit.peft("all4"), multilora_plugin.MultiLoRAConfig())
