"""LoRA on quantized bases (QLoRA): the quantized layer's own forward computes the base output, the
LoRA delta runs in the compute dtype, and every row of a mixed batch equals PEFT alone with its
adapter on the same quantized base: bitsandbytes 4-bit (nf4, fp4) and 8-bit, torchao int8
weight-only, optimum-quanto int8 and int4."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import multilora_plugin
from multilora_plugin import toy
from multilora_plugin.layers import MultiLoRALinear

from .conftest import TRITON_MISSING
from .oracle import Case

SPECS = {
    "all4": dict(r=4, lora_alpha=8, target_modules="all-linear", seed=1),
    "attn8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=2),
    "mlp16_rs": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True,
                     seed=3),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], use_dora=True, seed=5),
}
ROWS = ["all4", None, "attn8", "mlp16_rs", "dora", "all4", None]


def _needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


def quantization(name: str):
    """transformers' quantization config of each case (built lazily: the libraries are optional)."""
    from transformers import BitsAndBytesConfig, QuantoConfig, TorchAoConfig

    if name.startswith("bnb-4bit"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name.split("-")[2],
                                  bnb_4bit_compute_dtype=torch.float32)
    if name == "bnb-8bit":  # LLM.int8() without outlier columns: each row is quantized on its own
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    if name == "bnb-8bit-outliers":
        return BitsAndBytesConfig(load_in_8bit=True)
    if name == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    return QuantoConfig(weights=name.split("-")[-1])


CASES = [pytest.param("bnb-4bit-nf4", marks=_needs("bitsandbytes")),
         pytest.param("bnb-4bit-fp4", marks=_needs("bitsandbytes")),
         pytest.param("bnb-4bit-nf4-unpacked", marks=_needs("bitsandbytes")),
         pytest.param("bnb-8bit", marks=_needs("bitsandbytes")),
         pytest.param("torchao-int8", marks=_needs("torchao")),
         pytest.param("quanto-int8", marks=_needs("optimum.quanto")),
         pytest.param("quanto-int4", marks=_needs("optimum.quanto"))]

_CASES: dict = {}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny Llama saved as a checkpoint (quantizers work at load time) and its adapters."""
    root = tmp_path_factory.mktemp("quantized")
    base = toy.tiny_model("llama")
    base.save_pretrained(root / "base")
    return root / "base", {name: toy.make_adapter(base, root / name, **spec) for name, spec in SPECS.items()}


@pytest.fixture
def case(saved):
    def get(name: str) -> Case:
        if name not in _CASES:
            from transformers import AutoModelForCausalLM

            base_dir, paths = saved
            config = quantization(name)

            def fresh():
                model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, dtype=torch.float32,
                                                             device_map="cpu").eval()
                if name.endswith("-unpacked"):
                    _unpacked(model)
                return model

            _CASES[name] = Case(fresh, paths)
        return _CASES[name]

    return get


# On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at a layer's first forward for a kernel
# that computes in bfloat16 whatever the compute dtype (it casts its input), so an fp32 rounding
# difference of a LoRA delta (about 1e-7: a mixed batch runs other kernel shapes than PEFT, and folds
# the scaling into B) can flip the bf16 rounding of one input of the next 4-bit layer, one bf16 step
# (2**-8 relative). Without that packing ("-unpacked") and in every other case the base computes in fp32.
TOLERANCE = {"bnb-4bit-nf4": 2e-2, "bnb-4bit-fp4": 2e-2}
# bitsandbytes repacks 4-bit weights for its bf16 CPU kernel at a layer's first forward (on CPUs with
# AVX512-BF16), after which PEFT's DoRA dequantizes them into other values: PEFT is the oracle for DoRA
# on a 4-bit base only where that packing is off ("-unpacked", whose fp32 path is exact besides).
PEFT_DORA_WRONG = {"bnb-4bit-nf4", "bnb-4bit-fp4"}


def _unpacked(model):
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("name", CASES)
def test_mixed_forward_equals_peft_on_the_same_quantized_base(case, name):
    rows = [r for r in ROWS if r != "dora"] if name in PEFT_DORA_WRONG else ROWS
    case(name).check_mixed_forward(rows, atol=TOLERANCE.get(name, 1e-4))


@_needs("bitsandbytes")
def test_dora_on_a_4bit_base_reads_the_weight_its_forward_uses(case):
    """A DoRA slot written after bitsandbytes repacked the 4-bit weights (a forward ran) rescales
    exactly as one written before."""
    quantized = case("bnb-4bit-nf4")
    before = quantized.wrapped(max_loras=1)
    with torch.no_grad():
        before(input_ids=torch.tensor([[5, 9]]), adapter_names=["dora"])  # written before the first forward
        after = quantized.wrapped(max_loras=1)
        after(input_ids=torch.tensor([[5, 9]]))  # the base's first forward: weights repacked
        after(input_ids=torch.tensor([[5, 9]]), adapter_names=["dora"])
    for name in ("q_proj", "o_proj"):
        gains = [getattr(m.hf_model.model.layers[0].self_attn, name).gains[0] for m in (before, after)]
        assert gains[0].abs().max() > 0.05 and (gains[0] - gains[1]).abs().max().item() < 1e-5, name


@pytest.mark.slow  # Triton's interpreter, on CPU
@pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed")
@_needs("bitsandbytes")
def test_triton_kernels_on_a_4bit_base(case):
    case("bnb-4bit-nf4-unpacked").check_mixed_forward(ROWS, backend="triton")


@pytest.mark.parametrize("name", CASES[:4])
def test_the_quantized_layer_keeps_its_forward_and_slots_take_the_compute_dtype(case, name):
    model = case(name).wrapped()
    layer = model.hf_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, MultiLoRALinear) and not layer.base_layer.weight.dtype.is_floating_point
    assert layer.dtype == torch.float32


@_needs("bitsandbytes")
def test_generate_on_a_4bit_base(case):
    prompts = [[5, 9, 22, 7], [11, 12], [40, 41, 42, 43, 44], [8, 9, 10], [30, 31]]
    case("bnb-4bit-nf4-unpacked").check_generate(["all4", None, "attn8", "mlp16_rs", "dora"], prompts)


@_needs("bitsandbytes")
def test_llm_generate_on_a_4bit_base_with_fewer_slots_than_adapters(case):
    names = ["all4", "attn8", None, "mlp16_rs"]
    case("bnb-4bit-nf4").check_llm([([5 + i, 9, 22 + i][: 1 + i % 3], names[i % 4]) for i in range(8)], max_loras=2)


@_needs("bitsandbytes")
def test_transformers_continuous_batching_on_a_4bit_base(case):
    prompts = [[5, 9, 22, 7], [11, 12], [40, 41, 42], [8], [70, 3, 19, 4]]
    case("bnb-4bit-nf4").check_generate_batch(["all4", None, "attn8", "mlp16_rs", "all4"], prompts, max_loras=2)


@_needs("bitsandbytes")
def test_8bit_outlier_columns_depend_on_the_batch_as_in_peft(case):
    """LLM.int8()'s outlier decomposition (threshold 6.0, the default) picks its fp16 columns from the
    whole batch, so no row is independent of the others, with or without adapters. A batch of one
    adapter still equals PEFT on the same batch."""
    quantized = case("bnb-8bit-outliers")
    ids = torch.randint(4, 120, (3, 7), generator=torch.Generator().manual_seed(0))
    model = quantized.wrapped()
    for name in ("all4", None):
        with torch.no_grad():
            got = model(input_ids=ids, adapter_names=[name] * 3).logits
        assert (got - quantized.logits(name, ids)).abs().max().item() <= 1e-4, name


@_needs("bitsandbytes")
def test_over_http_on_a_4bit_base(case):
    from huggingface_hub import InferenceClient

    from multilora_plugin.integrations.local import running_server
    from multilora_plugin.integrations.server import create_app

    quantized, tokenizer = case("bnb-4bit-nf4"), toy.tiny_tokenizer(128)
    engine = multilora_plugin.Engine(quantized.wrapped(max_loras=2), tokenizer, load_entrypoints=False)
    with running_server(create_app(engine, served_model_name="tiny-nf4")) as url:
        client = InferenceClient(base_url=url)
        for name in ["all4", None, "attn8", "mlp16_rs"]:
            out = client.text_generation("a story about the city", adapter_id=name, max_new_tokens=6, details=True)
            want = quantized.greedy(name, tokenizer.encode("a story about the city"), 6)
            want = want[: want.index(3) + 1] if 3 in want else want  # cut at </s>
            assert [t.id for t in out.details.tokens] == want, name
    engine.close()


@_needs("bitsandbytes")
def test_engine_args_load_the_base_quantized(saved):
    """`multilora serve --model DIR --quantization bitsandbytes-4bit`: the base loads in nf4 and
    serves PEFT's tokens on the same 4-bit base."""
    import argparse

    from multilora_plugin import ConfigError, SamplingParams
    from multilora_plugin.integrations.engine_args import EngineArgs

    base_dir, paths = saved
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli_args(parser.parse_args(["--model", str(base_dir), "--tokenizer", str(base_dir),
                                                       "--device", "cpu", "--quantization", "bitsandbytes-4bit",
                                                       "--adapter", f"attn8={paths['attn8']}"]))
    tokenizer = toy.tiny_tokenizer(128)
    tokenizer.save_pretrained(base_dir)
    engine = args.build()
    layer = engine.model.hf_model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.quant_type == "nf4"
    engine.add_request("r", prompt_token_ids=[5, 9, 22], sampling_params=SamplingParams(
        max_new_tokens=5, temperature=0, ignore_eos=True), lora_request="attn8")
    done = [out for _ in range(10) for out in engine.step() if out.finished]
    expected = _CASES.get("bnb-4bit-nf4") or Case(lambda: _nf4(base_dir), paths)
    assert done[0].outputs[0].token_ids == expected.greedy("attn8", [5, 9, 22], 5)
    engine.close()
    with pytest.raises(ConfigError, match="quantization"):
        EngineArgs(quantization="gptq")


def _nf4(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization("bnb-4bit-nf4"),
                                                dtype=torch.float32, device_map="cpu").eval()
