"""`wrap(peft_model)`: a PeftModel's LoRA adapters, served under their PEFT names, give per row what
the PeftModel gave with that adapter active (recorded before wrapping, which takes it apart)."""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import multilora_plugin
from multilora_plugin import AdapterState, IncompatibleAdapterError, MultiLoRAConfig, MultiLoRAModel, WrapError, toy

from .conftest import padded_batch

ROWS = ["sql", "chat", None, "math"]
LENGTHS = [6, 4, 6, 5]


def lora_specs(arch: str) -> dict:
    """Three adapters that differ in rank, alpha, scaling rule and targets."""
    attn, mlp = toy.PROJECTIONS[arch]
    common = dict(init_lora_weights=False, fan_in_fan_out=arch == "gpt2")  # Conv1D stores weights [in, out]
    return {
        "sql": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **common),
        "chat": LoraConfig(r=8, lora_alpha=32, target_modules=list(attn), use_rslora=True, **common),
        "math": LoraConfig(r=16, lora_alpha=16, target_modules=list(mlp), layers_to_transform=[1], **common),
    }


def build_peft(arch: str = "llama", configs: dict = None) -> PeftModel:
    """A PeftModel holding `configs` ({name: PeftConfig}; default: `lora_specs`), the first one active."""
    configs = lora_specs(arch) if configs is None else configs
    torch.manual_seed(1)
    (first, first_config), *rest = configs.items()
    with warnings.catch_warnings():  # peft calls a transformers method that transformers deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(toy.tiny_model(arch), first_config, adapter_name=first)
    for name, config in rest:
        peft_model.add_adapter(name, config)
    return peft_model.eval()


def peft_logits(peft_model: PeftModel, ids, mask) -> dict:
    """{adapter name or None: PEFT's logits for the whole batch with that adapter active}."""
    with torch.no_grad():
        with peft_model.disable_adapter():
            out = {None: peft_model(input_ids=ids, attention_mask=mask).logits}
        for name in peft_model.peft_config:
            peft_model.set_adapter(name)
            out[name] = peft_model(input_ids=ids, attention_mask=mask).logits
    return out


def has_peft_layers(model) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_matches_peft_per_adapter(arch):
    peft_model = build_peft(arch)
    ids, mask = padded_batch(len(ROWS), LENGTHS)
    want = peft_logits(peft_model, ids, mask)
    model = multilora_plugin.wrap(peft_model, max_loras=3)
    assert isinstance(model, MultiLoRAModel)
    assert not has_peft_layers(model)  # unloaded: PEFT's layers are gone, nothing was merged
    assert list(model.adapters) == ["sql", "chat", "math"]
    assert {info.state for info in model.adapters.values()} == {AdapterState.CPU}
    assert model.adapters["chat"].rank == 8 and model.adapters["math"].alpha == 16
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_names=ROWS).logits
    for row, name in enumerate(ROWS):
        real = mask[row].bool()
        torch.testing.assert_close(got[row][real], want[name][row][real], atol=1e-4, rtol=0, msg=f"row {row} ({name})")
        if name is not None:  # the adapter really changed the row
            assert not torch.allclose(want[name][row][real], want[None][row][real], atol=1e-2)
    assert torch.equal(got[2], want[None][2])


def test_engine_generates_peft_tokens():
    peft_model = build_peft()
    prompt = [5, 6, 7]
    peft_model.set_adapter("chat")
    with torch.no_grad():
        want = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=4, do_sample=False)[0, 3:]
    llm = multilora_plugin.LLM(multilora_plugin.wrap(peft_model, max_loras=2), tokenizer=None)
    outputs = llm.generate([prompt], multilora_plugin.SamplingParams(max_new_tokens=4, temperature=0),
                           lora_request="chat", use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == want.tolist()


def test_adapters_beyond_cpu_tier_are_read_back_from_the_saved_copies():
    """One slot and one CPU copy: "sql" is read now, "chat" and "math" when first used, and each use evicts
    the previous one, so later uses read the saved directories again."""
    peft_model = build_peft()
    ids, mask = padded_batch(2, [5, 3], seed=1)
    want = peft_logits(peft_model, ids, mask)
    model = multilora_plugin.wrap(peft_model, max_loras=1, max_cpu_loras=1)
    states = [model.adapter_state(n) for n in ("sql", "chat", "math")]
    assert states == [AdapterState.CPU, AdapterState.COLD, AdapterState.COLD]
    with torch.no_grad():
        for name in ["chat", "math", "sql", "chat"]:
            got = model(input_ids=ids, attention_mask=mask, adapter_names=[name, name]).logits
            real = mask.bool()
            torch.testing.assert_close(got[real], want[name][real], atol=1e-4, rtol=0, msg=name)
    saved = model._peft_adapters_dir.name
    assert os.path.isdir(saved)
    del model, peft_model  # the PeftModel holds the base model, whose forward hooks hold `model`
    gc.collect()
    assert not os.path.exists(saved)


@pytest.mark.parametrize("config,found", [
    (IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), "IA3"),
    (PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "PREFIX_TUNING"),
], ids=["ia3", "prefix_tuning"])
def test_non_lora_adapters_are_refused(config, found):
    # a PeftModel holds one kind of adapter (PEFT refuses to mix), so this one holds only `config`
    peft_model = build_peft(configs={"extra": config})
    match = rf"PEFT adapter 'extra': expected a LoRA adapter .* but it is '{found}'"
    with pytest.raises(IncompatibleAdapterError, match=match):
        multilora_plugin.wrap(peft_model)
    assert peft_model.peft_config["extra"] is config  # untouched


@pytest.mark.parametrize("extra,wrap_kwargs,match", [
    (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["model.norm"]), {}, r"'bad'.*modules_to_save"),
    (LoraConfig(r=8, target_modules=["q_proj"]), dict(max_lora_rank=4), r"'bad'.*max_lora_rank=4"),
    (LoraConfig(r=4, target_modules=["v_proj"]), dict(target_modules=["q_proj", "o_proj", "up_proj"]),
     r"'bad'.*v_proj.*not wrapped"),
], ids=["modules_to_save", "rank", "unwrapped_module"])
def test_a_refused_adapter_leaves_the_peft_model_usable(extra, wrap_kwargs, match):
    configs = {"sql": LoraConfig(r=4, target_modules=["q_proj", "o_proj", "up_proj"], init_lora_weights=False),
               "bad": extra}
    peft_model = build_peft(configs=configs)
    ids, mask = padded_batch(2, [4, 4])
    before = peft_logits(peft_model, ids, mask)
    with pytest.raises(IncompatibleAdapterError, match=match):
        multilora_plugin.wrap(peft_model, **wrap_kwargs)
    assert has_peft_layers(peft_model)
    after = peft_logits(peft_model, ids, mask)
    for name in before:
        assert torch.equal(before[name], after[name])


def test_merged_adapters_are_refused():
    peft_model = build_peft()
    peft_model.merge_adapter()
    with pytest.raises(WrapError, match="unmerge_adapter"):
        multilora_plugin.wrap(peft_model)
    assert has_peft_layers(peft_model)


def test_peft_models_are_refused_by_the_constructor():
    peft_model = build_peft()
    for model in (peft_model, peft_model.get_base_model()):
        with pytest.raises(WrapError, match=r"pass the peft.PeftModel itself to `multilora_plugin.wrap\(\)`"):
            MultiLoRAModel(model, MultiLoRAConfig())
