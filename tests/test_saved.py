"""Trained module copies (PEFT's `modules_to_save`): an lm_head, the input embedding, a classifier's
`score`, mixed per row with plain LoRA, DoRA, MoE expert adapters, LoRA on the same embedding and base
rows: every row equals PEFT alone with its adapter, in forward, generate, the engine with fewer slots
than adapters, transformers' continuous batching (whose LM head sees only the kept rows) and HTTP."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import multilora_plugin
from multilora_plugin import IncompatibleAdapterError, WrapError, toy

from .conftest import backend_names
from .oracle import Case
from .test_moe import specs as moe_specs


def specs(arch: str) -> dict:
    """Adapters that save the LM head, the input embedding, or both (with LoRA elsewhere), one with
    LoRA on the embedding another adapter saves a copy of, a DoRA one and a plain one."""
    attn = toy.PROJECTIONS.get(arch, (("q_proj", "k_proj", "v_proj", "o_proj"), ()))[0]
    embedding = "wte" if arch == "gpt2" else "embed_tokens"
    common = dict(fan_in_fan_out=arch == "gpt2")
    return {
        "head": dict(r=4, lora_alpha=8, target_modules=list(attn[:1]), modules_to_save=["lm_head"], seed=1, **common),
        "embed": dict(r=2, lora_alpha=4, target_modules=list(attn[-1:]), modules_to_save=[embedding], seed=2,
                      **common),
        "both": dict(r=8, lora_alpha=8, target_modules=list(attn), modules_to_save=["lm_head", embedding], seed=3,
                     **common),
        "emb_lora": dict(r=4, lora_alpha=8, target_modules=[attn[0], embedding], seed=4, **common),
        "dora": dict(r=4, lora_alpha=8, target_modules=list(attn), use_dora=True, seed=5, **common),
        "plain": dict(r=4, lora_alpha=8, target_modules=list(attn[:1]), seed=6, **common),
    }


def tied_llama():
    model = toy.tiny_model("llama", seed=3)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    return model


_CASES: dict = {}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    def get(arch: str) -> Case:
        if arch not in _CASES:
            if arch == "tied":
                base, kinds = tied_llama(), specs("llama")
                kinds["tied_both"] = dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                          ensure_weight_tying=True, seed=7)
                kinds["tied_tokens"] = dict(r=2, lora_alpha=4, target_modules=["v_proj"], seed=8,
                                            trainable_token_indices=list(range(4, 120, 3)))
            else:
                base = toy.tiny_model(arch, hidden_size=32 if arch in toy.MOE_ARCHITECTURES else 64)
                kinds = specs(arch)
            if arch in toy.MOE_ARCHITECTURES:
                kinds["moe"] = moe_specs(arch)["all"]
            root = tmp_path_factory.mktemp(f"saved_{arch}")
            paths = {name: toy.make_adapter(base, root / name, **spec) for name, spec in kinds.items()}
            _CASES[arch] = Case(lambda: copy.deepcopy(base), paths)
        return _CASES[arch]

    return get


ROWS = ["head", None, "embed", "both", "emb_lora", "dora", "plain", "head", "embed"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_mixed_forward_equals_peft_alone(case, arch):
    case(arch).check_mixed_forward(ROWS)


def test_tied_embeddings(case):
    """A copy of a tied lm_head or embedding unties only that adapter's rows (PEFT's default); with
    `ensure_weight_tying` PEFT saves and ties both copies. Trainable tokens change both embeddings' rows
    of those ids."""
    case("tied").check_mixed_forward(["head", "tied_tokens", "embed", None, "tied_both", "both", "plain",
                                      "tied_tokens"])


def test_tied_trainable_tokens_in_generate_and_continuous_batching(case):
    tied = case("tied")
    prompts = [[5, 9, 22, 7], [11, 12], [40, 41, 42], [8, 10], [70, 3, 19, 4]]
    tied.check_generate(["tied_tokens", None, "head", "tied_tokens", "plain"], prompts)
    tied.check_generate_batch(["tied_tokens", None, "head", "tied_tokens", "plain"], prompts, max_loras=2)
    model = multilora_plugin.wrap(tied.fresh(), max_loras=1)
    info = model.load_adapter("tied_tokens", tied.paths["tied_tokens"])  # the rows count once, for both
    v_in, v_out = model._modules_info.wrapped["model.layers.0.self_attn.v_proj"]
    rows = len(range(4, 120, 3))
    assert info.num_bytes == model.config.num_hidden_layers * 2 * (v_in + v_out) * 4 + rows * (64 * 4 + 8)


def test_with_moe_adapters(case):
    case("mixtral").check_mixed_forward(["moe", "head", None, "embed", "moe", "both", "dora"])


@pytest.mark.parametrize("backend", backend_names())
def test_kernel_backends(case, backend):
    case("llama").check_mixed_forward(ROWS, backend=backend)


def test_generate(case):
    prompts = [[5, 9, 22, 7], [11, 12], [40, 41, 42, 43, 44], [8, 9, 10], [70, 3, 19], [13, 16]]
    case("gpt2").check_generate(["head", None, "embed", "both", "emb_lora", "plain"], prompts)


def test_llm_generate_with_fewer_slots_than_adapters_dora_and_moe_among_them(case):
    names = ["head", "moe", "embed", None, "dora", "both", "emb_lora", "plain"]
    requests = [([5 + i, 9, 22 + i, 7][: 2 + i % 3], names[i % len(names)]) for i in range(16)]
    case("mixtral").check_llm(requests, max_loras=2)


def test_transformers_continuous_batching(case):
    """Its LM head sees only the last row of each request that takes a token (`logits_to_keep`)."""
    prompts = [[5, 9, 22, 7], [11, 12], [40, 41, 42], [8], [70, 3, 19, 4], [10, 13, 16], [22, 25]]
    case("llama").check_generate_batch(["head", None, "embed", "both", "plain", "head", "emb_lora"], prompts,
                                       max_loras=2)


def test_lora_on_the_lm_head_in_continuous_batching(case, tmp_path):
    """LoRA on the output embedding reads the same kept rows."""
    llama = case("llama")
    path = toy.make_adapter(llama.fresh(), tmp_path / "lm_lora", r=4, target_modules=["q_proj", "lm_head"], seed=9)
    with_head = Case(llama.fresh, {**llama.paths, "lm_lora": path})
    prompts = [[5, 9, 22, 7], [11, 12], [40, 41, 42], [8, 9]]
    original = with_head.wrapped

    def wrapped(max_loras=4, **kwargs):
        return original(max_loras=max_loras, target_modules=["q_proj", "v_proj", "o_proj", "lm_head"], **kwargs)

    with_head.wrapped = wrapped
    with_head.check_generate_batch(["lm_lora", None, "head", "lm_lora"], prompts, max_loras=2)


def test_over_http(case):
    case("llama").check_http(["head", None, "both", "embed", "plain"])


def test_classification_heads(tmp_path):
    """PEFT saves a SEQ_CLS adapter's `score` head: per row, each adapter's head."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = toy.tiny_config("llama")
    config.num_labels = 3
    base = AutoModelForSequenceClassification.from_config(config).eval()
    paths = {name: toy.make_adapter(base, tmp_path / name, r=4, target_modules=["q_proj", "v_proj"], seed=seed,
                                    task_type="SEQ_CLS") for name, seed in (("a", 1), ("b", 2))}
    Case(lambda: copy.deepcopy(base), paths).check_mixed_forward(["a", None, "b", "a"])
    assert multilora_plugin.wrap(copy.deepcopy(base)).saved_modules == ("model.embed_tokens", "score")


def test_a_peft_model_with_copies_is_served_mixed(case):
    """`wrap(peft_model)`: PEFT's `unload()` would leave the active adapter's copy in the model."""
    case("llama").check_peft_model(["head", "embed", "plain"], [None, "head", "embed", "plain"])


def test_a_copy_is_counted_in_both_tiers(case):
    """A copy of the LM head is most of the adapter; it takes slot memory only while in a slot."""
    llama = case("llama")
    model = multilora_plugin.wrap(llama.fresh(), max_loras=1)
    info = model.load_adapter("head", llama.paths["head"])  # rank 4 on q_proj, and lm_head's weight
    vocab, dim = model.config.vocab_size, model.config.hidden_size
    q_in, q_out = model._modules_info.wrapped["model.layers.0.self_attn.q_proj"]
    assert info.num_bytes == (model.config.num_hidden_layers * 4 * (q_in + q_out) + vocab * dim) * 4
    assert "lm_head.modules_to_save" in info.target_modules
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]]), adapter_names=["head"])
    assert model.memory_stats().gpu_bytes == info.num_bytes  # the copy and the pairs, in slot memory
    plain = model.load_adapter("plain", llama.paths["plain"])
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]]), adapter_names=["plain"])  # takes the only slot
    assert model.memory_stats().gpu_bytes == plain.num_bytes


def test_a_copy_replaced_on_disk_is_served_anew(case, tmp_path):
    llama = case("llama")
    model = llama.wrapped(max_loras=2)
    ids = torch.randint(4, 120, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=["head", "head"]).logits
    path = shutil.copytree(llama.paths["head"], tmp_path / "head")
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] * 2
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    model.load_adapter("head", path, replace=True)
    with torch.no_grad():
        after = model(input_ids=ids, adapter_names=["head", None]).logits
    assert (after[0] - before[0]).abs().max().item() > 0.1
    assert (after[1] - llama.logits(None, ids)[1]).abs().max().item() <= 1e-5


def _edited(case, tmp_path, edit):
    path = shutil.copytree(case("llama").paths["head"], tmp_path / "edited")
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("edit,words", [
    (lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(100, 64)}),
     r"copy of 'lm_head': expected weight of shape \[128, 64\], but found \[100, 64\]"),
    (lambda t: t.update({"base_model.model.lm_head.scale": torch.zeros(3)}), "has no such parameter"),
    (lambda t: t.update({"base_model.model.lm_head.weight": torch.full((128, 64), float("nan"))}), "NaN or Inf"),
], ids=["shape", "unknown_parameter", "nan"])
def test_bad_copies_are_refused_and_change_nothing(case, tmp_path, edit, words):
    model = case("llama").wrapped(max_loras=2)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=["head"]).logits
    with pytest.raises(multilora_plugin.MultiLoRAError, match=words):
        model.load_adapter("bad", _edited(case, tmp_path, edit))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, adapter_names=["head"]).logits, before)
    assert "bad" not in model.adapters


def test_copies_only_of_modules_that_work_token_by_token(case):
    llama = case("llama")
    with pytest.raises(WrapError, match="'model.layers.0.mlp' is a LlamaMLP"):
        multilora_plugin.wrap(llama.fresh(), modules_to_save=["layers.0.mlp"])
    model = multilora_plugin.wrap(llama.fresh(), modules_to_save=None)
    with pytest.raises(IncompatibleAdapterError, match="wrap with modules_to_save="):
        model.load_adapter("head", llama.paths["head"])
    norm = multilora_plugin.wrap(llama.fresh(), modules_to_save=["model.norm", "lm_head"])
    assert norm.saved_modules == ("model.norm", "lm_head")
    norm.unwrap()
    assert type(norm.hf_model.lm_head) is torch.nn.Linear and type(norm.hf_model.model.norm).__name__ == "LlamaRMSNorm"
