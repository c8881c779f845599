"""DoRA, LoRA biases, LoRA on the input embedding and trainable tokens, mixed per row with plain LoRA,
MoE expert adapters and base rows: every row equals PEFT alone with its adapter (PEFT itself refuses
`adapter_names` with DoRA), in forward, generate, the engine with fewer slots than adapters,
transformers' continuous batching and HTTP, on both kernel backends."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import multilora_plugin
from multilora_plugin import IncompatibleAdapterError, toy

from .conftest import backend_names
from .oracle import Case
from .test_moe import specs as moe_specs


TOKENS = list(range(4, 120, 3))  # trainable token ids: most prompts hold some


def specs(arch: str) -> dict:
    """Two DoRA adapters (one with rsLoRA), one with LoRA biases, one with LoRA on the input embedding,
    two with trainable tokens (PEFT's list and dict forms), a plain one; `fan_in_fan_out` on GPT-2.
    `toy.make_adapter` gives magnitudes, biases and tokens trained-like values."""
    attn, mlp = toy.PROJECTIONS.get(arch, (("q_proj", "k_proj", "v_proj", "o_proj"), ()))
    embedding = "wte" if arch == "gpt2" else "embed_tokens"
    common = dict(fan_in_fan_out=arch == "gpt2")
    return {
        "emb": dict(r=8, lora_alpha=16, target_modules=[attn[0], embedding], seed=5, **common),
        "emb_dora": dict(r=4, lora_alpha=8, target_modules=[attn[-1], embedding], use_dora=True, seed=8, **common),
        "tokens": dict(r=4, lora_alpha=8, target_modules=list(attn[-1:]), trainable_token_indices=TOKENS, seed=6,
                       **common),
        "tokens_dict": dict(r=2, lora_alpha=4, target_modules=list(attn[:1]),
                            trainable_token_indices={embedding: TOKENS[::2]}, seed=7, **common),
        "dora": dict(r=4, lora_alpha=8, target_modules="all-linear" if mlp else list(attn), use_dora=True, seed=1,
                     **common),
        "dora_rs": dict(r=8, lora_alpha=8, target_modules=list(attn), use_dora=True, use_rslora=True, seed=2, **common),
        "bias": dict(r=4, lora_alpha=16, target_modules=list(mlp or attn), lora_bias=True, seed=3, **common),
        "plain": dict(r=4, lora_alpha=8, target_modules=list(attn[:1]), seed=4, **common),
    }


_CASES: dict = {}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    def get(arch: str) -> Case:
        if arch not in _CASES:
            base = toy.tiny_model(arch, hidden_size=32 if arch in toy.MOE_ARCHITECTURES else 64)
            root = tmp_path_factory.mktemp(f"variants_{arch}")
            kinds = specs(arch)
            if arch in toy.MOE_ARCHITECTURES:  # and an adapter on the experts and the router
                kinds["moe"] = moe_specs(arch)["all"]
            paths = {name: toy.make_adapter(base, root / name, **spec) for name, spec in kinds.items()}
            _CASES[arch] = Case(lambda: copy.deepcopy(base), paths)
        return _CASES[arch]

    return get


ROWS = ["dora", None, "bias", "emb", "tokens", "dora_rs", "plain", "tokens_dict", "emb_dora", "dora"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "opt"])
def test_mixed_forward_equals_peft_alone(case, arch):
    case(arch).check_mixed_forward(ROWS)  # GPT-2: Conv1D, [in, out] weights; Qwen2, OPT: base biases


def test_with_moe_adapters(case):
    case("mixtral").check_mixed_forward(["moe", "dora", None, "bias", "emb", "moe", "tokens", "dora_rs"])


@pytest.mark.parametrize("backend", backend_names())
def test_kernel_backends(case, backend):
    case("llama").check_mixed_forward(ROWS, backend=backend)


def test_dora_is_not_plain_lora(case, tmp_path):
    """The same weights read without DoRA give another output: the rescale is served, not dropped."""
    llama = case("llama")
    plain = shutil.copytree(llama.paths["dora"], tmp_path / "as_plain")
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    ids = torch.randint(4, 120, (1, 6), generator=torch.Generator().manual_seed(0))
    model = multilora_plugin.wrap(llama.fresh(), max_loras=2)
    model.load_adapter("dora", llama.paths["dora"])
    model.load_adapter("as_plain", plain)
    with torch.no_grad():
        dora, as_plain = (model(input_ids=ids, adapter_names=[n]).logits for n in ("dora", "as_plain"))
    assert (dora - as_plain).abs().max().item() > 0.1


def test_generate(case):
    prompts = [[5, 9, 22, 7], [11, 12], [40, 41, 42, 43, 44], [8, 9, 10], [70, 3, 19], [13, 16], [10, 22, 7]]
    case("gpt2").check_generate(["dora", None, "bias", "dora_rs", "emb", "tokens", "emb_dora"], prompts)


def test_llm_generate_with_fewer_slots_than_adapters_dora_and_moe_among_them(case):
    names = ["dora", "moe", "bias", None, "emb", "dora_rs", "tokens", "plain", "emb_dora"]
    requests = [([5 + i, 9, 22 + i, 7][: 2 + i % 3], names[i % len(names)]) for i in range(16)]
    case("mixtral").check_llm(requests, max_loras=2)


def test_transformers_continuous_batching(case):
    prompts = [[5, 9, 22, 7], [11, 12], [40, 41, 42], [8], [70, 3, 19, 4]]
    prompts += [[10, 13, 16], [22, 25]]
    case("llama").check_generate_batch(["dora", None, "bias", "dora_rs", "plain", "emb", "tokens"], prompts,
                                       max_loras=2)


def test_over_http(case):
    case("llama").check_http(["dora", None, "bias", "dora_rs", "emb", "tokens"])


def test_the_magnitude_and_bias_are_counted(case):
    llama = case("llama")
    model = multilora_plugin.wrap(llama.fresh(), max_loras=2)
    info = model.load_adapter("dora", llama.paths["dora"])  # rank 4 on every linear layer, plus its magnitude
    shapes = [model._modules_info.wrapped[n] for n in info.target_modules]
    assert len(shapes) == 7 * model.config.num_hidden_layers
    plain_like, outs = sum(4 * (i + o) for i, o in shapes), sum(o for _, o in shapes)
    assert info.num_bytes == (plain_like + outs) * 4


def test_trainable_tokens_are_counted_and_checked(case, tmp_path):
    llama = case("llama")
    model = multilora_plugin.wrap(llama.fresh(), max_loras=2)
    info = model.load_adapter("tokens", llama.paths["tokens"])  # rank 4 on o_proj, and len(TOKENS) new rows
    (o_in, o_out), dim = model._modules_info.wrapped["model.layers.0.self_attn.o_proj"], model.config.hidden_size
    assert info.num_bytes == model.config.num_hidden_layers * 4 * (o_in + o_out) * 4 + len(TOKENS) * (dim * 4 + 8)
    tied = toy.tiny_model("llama", seed=3)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    tied.config.tie_word_embeddings = True
    path = toy.make_adapter(tied, tmp_path / "tied", r=2, target_modules=["q_proj"], trainable_token_indices=[5])
    with pytest.raises(IncompatibleAdapterError, match="ties its input and output embeddings.*'lm_head'"):
        multilora_plugin.wrap(tied, max_loras=1, modules_to_save=None).load_adapter("tied", path)  # served: test_saved
    bad = shutil.copytree(llama.paths["tokens"], tmp_path / "bad")
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "trainable_token_indices": [*TOKENS[:-1], 999]}))
    with pytest.raises(IncompatibleAdapterError, match="trainable token ids should be in 0..127"):
        model.load_adapter("bad", bad)


def test_a_peft_model_of_these_kinds_is_served_mixed(case):
    """`wrap(peft_model)` with DoRA, embedding LoRA and LoRA-bias adapters (PEFT refuses to mix DoRA)."""
    case("llama").check_peft_model(["dora", "emb", "bias"], ["emb", "dora", None, "bias"])
