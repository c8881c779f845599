"""LoRA on fused MoE experts and routers (PEFT `target_parameters`), mixed per row with plain LoRA and
base rows: every row equals PEFT alone with its adapter (PEFT itself cannot mix these), in forward,
generate, the engine, transformers' continuous batching and over HTTP; on Mixtral, Qwen3-MoE, OLMoE
and gpt-oss, with each of transformers' experts implementations."""

from __future__ import annotations

import copy

import pytest
import torch
from huggingface_hub import InferenceClient

import multilora_plugin
from multilora_plugin import IncompatibleAdapterError, toy
from multilora_plugin.experts import MultiLoRAExperts
from multilora_plugin.integrations.local import running_server
from multilora_plugin.integrations.server import create_app
from multilora_plugin.router import MultiLoRARouter

from .conftest import backend_names
from .oracle import Case

ROUTER = {"gpt_oss": "router.weight"}  # the router's parameter; "gate.weight" elsewhere
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
EOS = 3  # the tiny tokenizer's </s>


def specs(arch: str) -> dict:
    """An "all-linear" adapter (PEFT writes target_parameters for the experts and the router; for
    gpt-oss, whose all-linear leaves them out, they are named), an experts-only adapter, one on
    down_proj only with rsLoRA and a rank pattern, and a plain LoRA adapter."""
    all_linear = dict(target_parameters=[*EXPERTS, ROUTER[arch]]) if arch in ROUTER else {}
    return {
        "all": dict(r=4, lora_alpha=8, target_modules="all-linear", seed=1, **all_linear),
        "experts": dict(r=2, lora_alpha=8, target_modules=[], target_parameters=EXPERTS, seed=2),
        "down_rs": dict(r=4, lora_alpha=16, target_modules=["q_proj"], target_parameters=["down_proj"],
                        use_rslora=True, rank_pattern={"down_proj": 2}, seed=3),
        "plain": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=4),
    }


_CASES: dict = {}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    def get(arch: str, experts_implementation=None) -> Case:
        key = (arch, experts_implementation)
        if key not in _CASES:
            base = toy.tiny_model(arch, hidden_size=32, experts_implementation=experts_implementation)
            root = tmp_path_factory.mktemp(f"moe_{arch}")
            paths = {name: toy.make_adapter(base, root / name, **spec) for name, spec in specs(arch).items()}
            _CASES[key] = Case(lambda: copy.deepcopy(base), paths)
        return _CASES[key]

    return get


ROWS = ["all", "experts", None, "plain", "down_rs", "all"]


@pytest.mark.parametrize("arch", toy.MOE_ARCHITECTURES)
def test_mixed_forward_equals_peft_alone(case, arch):
    case(arch).check_mixed_forward(ROWS)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_every_experts_implementation(case, implementation):
    case("mixtral", implementation).check_mixed_forward(ROWS)
    case("gpt_oss", implementation).check_mixed_forward(ROWS)  # transposed weights, biases, its own gate


@pytest.mark.parametrize("backend", backend_names())
def test_kernel_backends(case, backend):
    case("qwen3_moe").check_mixed_forward(ROWS, backend=backend)


def test_generate(case):
    prompts = [[5, 9, 22, 7], [11, 12], [40, 41, 42, 43, 44], [8, 9, 10], [70, 3, 19]]
    case("mixtral").check_generate(["all", "experts", None, "plain", "down_rs"], prompts)


def test_llm_generate_with_fewer_slots_than_adapters(case):
    names = ["all", "experts", "down_rs", "plain", None]
    requests = [([5 + i, 9, 22 + i, 7][: 2 + i % 3], names[i % len(names)]) for i in range(10)]
    case("olmoe").check_llm(requests, max_loras=2)


def test_transformers_continuous_batching(case):
    prompts = [[5, 9, 22, 7], [11, 12], [40, 41, 42], [8], [70, 3, 19, 4]]
    case("qwen3_moe").check_generate_batch(["all", None, "experts", "down_rs", "plain"], prompts, max_loras=2)


def test_over_http(case):
    moe = case("mixtral")
    tokenizer = toy.tiny_tokenizer(128)
    engine = multilora_plugin.Engine(moe.wrapped(max_loras=2), tokenizer, load_entrypoints=False)
    with running_server(create_app(engine, served_model_name="tiny-moe")) as url:
        client = InferenceClient(base_url=url)
        for name in ["all", None, "experts", "plain", "down_rs"]:
            out = client.text_generation("the water at night", adapter_id=name, max_new_tokens=6, details=True)
            prompt = tokenizer.encode("the water at night")
            want = moe.greedy(name, prompt, 6)
            want = want[: want.index(EOS) + 1] if EOS in want else want
            assert [t.id for t in out.details.tokens] == want, name
    engine.close()


def test_what_is_wrapped_and_the_memory_counted(case):
    moe = case("mixtral")
    model = multilora_plugin.wrap(moe.fresh(), max_loras=2, max_lora_rank=8)
    kinds = {type(m).__name__ for n, m in model.hf_model.named_modules() if n.endswith(("experts", "gate"))}
    assert kinds == {MultiLoRAExperts.__name__, MultiLoRARouter.__name__}
    info = model.load_adapter("all", moe.paths["all"])
    config, layers, experts = model.config, model.config.num_hidden_layers, model.config.num_local_experts
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    r, r_gate_up = 4, 8  # PEFT's all-linear gives the fused gate_up_proj twice the rank
    attention = r * (h + h) * 2 + r * (h + kv) * 2  # q, o: [r, h] + [h, r]; k, v: [r, h] + [kv, r]
    per_layer = attention + experts * (r_gate_up * (h + 2 * i) + r * (i + h)) + r * (h + experts)
    assert info.num_bytes == layers * per_layer * 4  # fp32: every expert's A and B are counted
    assert set(info.target_modules) >= {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate"}
    assert model.memory_stats().gpu_bytes == 0 and model.memory_stats().slot_buffer_bytes == 0
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]]), adapter_names=["all"])
    stats = model.memory_stats()  # in a slot, every expert's pair takes its own rank, nothing padded
    assert stats.gpu_bytes == stats.slot_memory_bytes - stats.slot_free_bytes
    assert 0 <= stats.gpu_bytes - info.num_bytes < 0.01 * info.num_bytes  # pieces aligned to 8 elements
    base = moe.fresh()
    assert type(model.unwrap().model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)


def test_adapters_that_do_not_fit_are_refused(case, tmp_path):
    moe = case("mixtral")
    model = multilora_plugin.wrap(moe.fresh(), max_loras=2, max_lora_rank=4)
    with pytest.raises(IncompatibleAdapterError, match="max_lora_rank"):
        model.register_adapter("all", moe.paths["all"])  # gate_up_proj has rank 8
    fewer = _with_experts(toy.tiny_model("mixtral", hidden_size=32, seed=1), 2)
    path = toy.make_adapter(fewer, tmp_path / "two", r=2, target_modules=[], target_parameters=EXPERTS)
    with pytest.raises(IncompatibleAdapterError, match="4 experts x rank 2"):
        model.load_adapter("two", path)
    assert "two" not in model.adapters


def _with_experts(model, num: int):
    """`model` with its experts cut to the first `num` (an adapter trained on it has num experts)."""
    for layer in model.model.layers:
        experts = layer.mlp.experts
        experts.num_experts = num
        experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj[:num].clone())
        experts.down_proj = torch.nn.Parameter(experts.down_proj[:num].clone())
    return model


def test_a_peft_model_of_moe_adapters_is_served_mixed(case):
    """`wrap(peft_model)`: PEFT's own model of an expert adapter (which it cannot mix with others)
    serves it mixed. (PEFT holds several `target_parameters` adapters only if they target the same
    parameters.)"""
    from peft import PeftModel

    moe = case("olmoe")
    peft_model = PeftModel.from_pretrained(moe.fresh(), moe.paths["all"], adapter_name="all")
    peft_model.load_adapter(moe.paths["plain"], adapter_name="plain")
    model = multilora_plugin.wrap(peft_model, max_loras=2)
    ids = torch.randint(4, 120, (3, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=["plain", None, "all"]).logits
    for i, name in enumerate(["plain", None, "all"]):
        assert (got[i] - moe.logits(name, ids)[i]).abs().max().item() <= 1e-4, name


def test_a_router_that_casts_its_weight_gets_its_delta(case):
    """DeepSeek-V3-style routers apply `self.weight.type(torch.float32)`: the delta follows the cast."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    moe = case("mixtral")
    model = moe.wrapped(max_loras=2)
    ids = torch.randint(4, 120, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=["all", None]).logits
        original = MixtralTopKRouter.forward

        def casting(self, hidden_states):
            hidden_states = hidden_states.reshape(-1, self.hidden_dim)
            logits = torch.nn.functional.linear(hidden_states.type(torch.float64), self.weight.type(torch.float64))
            probs = torch.softmax(logits.float(), dim=-1)
            top, index = torch.topk(probs, self.top_k, dim=-1)
            return logits.float(), top / top.sum(dim=-1, keepdim=True), index

        MixtralTopKRouter.forward = casting
        try:
            got = model(input_ids=ids, adapter_names=["all", None]).logits
        finally:
            MixtralTopKRouter.forward = original
    assert (got - want).abs().max().item() <= 1e-4
