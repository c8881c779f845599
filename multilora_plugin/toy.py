"""Tiny, randomly initialised models, tokenizers and PEFT adapters, all built locally (no hub).

The demo, the tests and the benchmarks use these so that everything runs offline on a CPU. The
adapters are real PEFT directories written by `get_peft_model(...).save_pretrained(...)`.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "opt", "gpt_neox")
# fused 3-D experts and a router; Qwen2-MoE adds a shared expert, DeepSeek-V3 (MLA attention, a dense
# first layer) a router that casts its weight to fp32
MOE_ARCHITECTURES = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "qwen2_moe", "deepseek_v3")

# (attention projections, MLP projections) per architecture, as PEFT would target them
PROJECTIONS = {
    "llama": (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")),
    "mistral": (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")),
    "qwen2": (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")),
    "gpt2": (("c_attn",), ("c_fc", "mlp.c_proj")),
    "opt": (("q_proj", "k_proj", "v_proj", "out_proj"), ("fc1", "fc2")),
    "gpt_neox": (("query_key_value", "attention.dense"), ("dense_h_to_4h", "dense_4h_to_h")),
}

_WORDS = (
    "the a an of to in on for with and or but not is are was be have has do say get make go know take see "
    "come think look want give use find tell ask work seem feel try leave call good new first last long "
    "great little own other old right big high small large next early young important few public bad same "
    "able time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question number night point home "
    "water room mother area money story fact month lot study book eye job word business issue side kind "
    "head house service friend father power hour game line end member law car city community name team "
    "minute idea kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force education"
).split()


# "<s> user : hi </s> assistant :" for [{"role": "user", "content": "hi"}] and a generation prompt
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def tiny_config(arch: str, *, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 128,
                num_heads: int = 4, intermediate_size: Optional[int] = None, initializer_range: float = 0.1,
                max_positions: int = 512, num_experts: int = 4):
    """A transformers config for a tiny decoder-only model of architecture `arch` (`num_experts`: per
    MoE layer, top-2 routed, for the MoE architectures)."""
    from transformers import (GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig,
                              Qwen2Config)

    if arch in MOE_ARCHITECTURES:
        return _moe_config(arch, hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size,
                           num_heads=num_heads, intermediate_size=intermediate_size,
                           initializer_range=initializer_range, max_positions=max_positions,
                           num_experts=num_experts)

    inter = intermediate_size or 2 * hidden_size
    common = dict(vocab_size=vocab_size, initializer_range=initializer_range, pad_token_id=0,
                  bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    llama_like = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=max(1, num_heads // 2), intermediate_size=inter,
                      max_position_embeddings=max_positions, **common)
    if arch == "llama":
        return LlamaConfig(**llama_like)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **llama_like)
    if arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, **llama_like)  # q/k/v carry biases
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=inter,
                          n_positions=max_positions, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         ffn_dim=inter, max_position_embeddings=max_positions, word_embed_proj_dim=hidden_size,
                         enable_bias=True, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                             intermediate_size=inter, max_position_embeddings=max_positions, rotary_pct=0.5, **common)
    raise ValueError(f"`arch` should be one of {ARCHITECTURES + MOE_ARCHITECTURES}, but got {arch!r}")


def _moe_config(arch: str, *, hidden_size: int, num_layers: int, vocab_size: int, num_heads: int,
                intermediate_size: Optional[int], initializer_range: float, max_positions: int,
                num_experts: int = 4, top_k: int = 2):
    """A tiny MoE config: `num_experts` experts of `intermediate_size`, `top_k` of them per token."""
    from transformers import (DeepseekV3Config, GptOssConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig,
                              Qwen3MoeConfig)

    inter = intermediate_size or hidden_size
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
                  max_position_embeddings=max_positions, initializer_range=initializer_range, pad_token_id=0,
                  bos_token_id=2, eos_token_id=3, tie_word_embeddings=False, num_experts_per_tok=top_k)
    if arch == "mixtral":
        return MixtralConfig(intermediate_size=inter, num_local_experts=num_experts, sliding_window=None, **common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=2 * inter, moe_intermediate_size=inter, num_experts=num_experts,
                              head_dim=hidden_size // num_heads, norm_topk_prob=True, **common)
    if arch == "olmoe":
        return OlmoeConfig(intermediate_size=inter, num_experts=num_experts, **common)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(intermediate_size=2 * inter, moe_intermediate_size=inter, num_experts=num_experts,
                              shared_expert_intermediate_size=inter, **common)
    if arch == "deepseek_v3":
        head = hidden_size // num_heads
        return DeepseekV3Config(intermediate_size=2 * inter, moe_intermediate_size=inter, n_routed_experts=num_experts,
                                n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
                                kv_lora_rank=hidden_size // 2, qk_rope_head_dim=head // 2, qk_nope_head_dim=head // 2,
                                v_head_dim=head, **{**common, "num_key_value_heads": num_heads})
    return GptOssConfig(intermediate_size=inter, num_local_experts=num_experts, head_dim=hidden_size // num_heads,
                        layer_types=(["sliding_attention", "full_attention"] * num_layers)[:num_layers],
                        sliding_window=8, **common)


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32,
               experts_implementation: Optional[str] = None, **config_kwargs) -> nn.Module:
    """A randomly initialised causal LM in eval mode, reproducible from `seed`. `experts_implementation`
    (MoE models): transformers' "eager", "grouped_mm" or "batched_mm"; None: transformers' default."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    extra = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs), dtype=dtype, **extra)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random models: always generate max_new_tokens
    return model.eval()


def tiny_tokenizer(vocab_size: int = 128):
    """A word-level fast tokenizer of `vocab_size` tokens: <pad>=0, <unk>=1, <s>=2, </s>=3, then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + list(_WORDS)
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    vocab = {w: i for i, w in enumerate(words[:vocab_size])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_adapter(model: nn.Module, path: Union[str, os.PathLike], *, r: int = 8, lora_alpha: float = 16,
                 target_modules: Union[str, Sequence[str]] = "all-linear", seed: int = 0,
                 task_type: str = "CAUSAL_LM", **lora_kwargs) -> str:
    """Write a random PEFT LoRA adapter for `model` (which stays untouched) to `path`.

    `init_lora_weights=False` makes both A and B random, so every adapter changes the output.
    `task_type="SEQ_CLS"` (for a sequence-classification model) saves its `score` head, as PEFT does.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, init_lora_weights=False,
                        task_type=task_type, **lora_kwargs)
    with warnings.catch_warnings():  # peft calls a transformers method that transformers deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(os.fspath(path))
    if config.use_dora or config.lora_bias or config.trainable_token_indices or config.modules_to_save:
        _as_trained(os.fspath(path), seed)
    return os.fspath(path)


def _as_trained(path: str, seed: int) -> None:
    """Give DoRA magnitudes, LoRA biases, trainable tokens and saved module copies values that
    training would: PEFT initialises the magnitude to the merged weight's row norms (a rescale of
    exactly 1), the bias to zero, the tokens to the embedding's own rows and a copy to the module
    itself, which would make all four change nothing."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    generator = torch.Generator().manual_seed(seed + 1000)
    copies = []  # (as saved, as trained)
    for key, t in tensors.items():
        if key.endswith(".lora_magnitude_vector"):
            tensors[key] = t * (1 + 0.3 * torch.randn(t.shape, generator=generator))
        elif key.endswith(".lora_B.bias"):
            tensors[key] = 0.3 * torch.randn(t.shape, generator=generator)
        elif key.endswith(".trainable_tokens_delta"):
            tensors[key] = t + 0.5 * torch.randn(t.shape, generator=generator)
        elif "lora_" not in key and ".base_layer." not in key:  # a module copy (`modules_to_save`)
            # copies PEFT ties (`ensure_weight_tying`) are saved equal, and stay equal
            tensors[key] = next((new.clone() for old, new in copies if torch.equal(old, t)), None)
            if tensors[key] is None:
                tensors[key] = t + 0.5 * t.abs().mean() * torch.randn(t.shape, generator=generator)
                copies.append((t, tensors[key]))
    save_file(tensors, file, metadata={"format": "pt"})


# The demo's base model and adapters (`multilora demo`, `multilora serve` without --model): different
# ranks, alphas, target sets and scaling rules.
DEMO_ADAPTERS = {
    "sql": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=1),
    "chat": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=2),
    "poem": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True, seed=3),
    "code": dict(r=2, lora_alpha=4, target_modules=["o_proj"], seed=4),
}
DEMO_VOCAB = 256


def demo_model(seed: int = 0) -> nn.Module:
    """The demo's tiny Llama (the same weights for the same seed, in any process)."""
    return tiny_model("llama", seed=seed, hidden_size=64, num_layers=2, vocab_size=DEMO_VOCAB)


def demo_tokenizer():
    return tiny_tokenizer(DEMO_VOCAB)


def demo_adapters(model: nn.Module, root: Union[str, os.PathLike]) -> dict:
    """Write the demo's adapters for `model` under `root`; returns {name: path}."""
    return {name: make_adapter(model, os.path.join(os.fspath(root), name), **spec)
            for name, spec in DEMO_ADAPTERS.items()}


def make_adapters(model: nn.Module, root: Union[str, os.PathLike], names: Sequence[str], *, r: int = 4,
                  lora_alpha: float = 8, target_modules: Union[str, Sequence[str]] = "all-linear",
                  seed: int = 0) -> dict:
    """Write one random PEFT LoRA adapter per name under `root`, fast enough for thousands.

    One PEFT model is built; before each `save_pretrained` its LoRA weights are drawn afresh, so
    every adapter differs. Returns {name: path}.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, init_lora_weights=False,
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(copy.deepcopy(model), config)
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    generator = torch.Generator().manual_seed(seed)
    paths = {}
    for name in names:
        with torch.no_grad():
            for p in lora:  # scaled by 1/sqrt(fan-in) so that deltas stay of the order of the base output
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
        paths[name] = os.path.join(os.fspath(root), name)
        peft_model.save_pretrained(paths[name])
    return paths


def make_eval_tasks(root: Union[str, os.PathLike], *, docs: int = 12, seed: int = 0) -> str:
    """Write three lm-eval tasks on local json data (no hub) under `root` and return it, for
    `TaskManager(include_path=root)`: `toy_choice` (multiple_choice, acc), `toy_generate`
    (generate_until, stopped at "the" or "and", exact_match) and `toy_rolling` (loglikelihood_rolling,
    perplexities), all in words of `tiny_tokenizer`'s vocabulary."""
    import json
    import random

    rng = random.Random(seed)
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))

    data = {
        "choice": [{"question": words(4, 9), "choices": [words(1, 3) for _ in range(4)], "answer": rng.randrange(4)}
                   for _ in range(docs)],
        "generate": [{"question": words(3, 8), "answer": words(1, 3)} for _ in range(docs)],
        "rolling": [{"text": words(20, 60)} for _ in range(docs)],
    }
    specs = {
        "choice": ("multiple_choice", 'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                   "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"),
        "generate": ("generate_until", 'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                     "generation_kwargs:\n  until: [\"the\", \"and\"]\n  max_gen_toks: 8\n  do_sample: false\n"
                     "metric_list:\n  - metric: exact_match\n"),
        "rolling": ("loglikelihood_rolling", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
                    "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"),
    }
    for name, (output_type, rest) in specs.items():
        path = os.path.join(root, f"{name}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(doc) + "\n" for doc in data[name])
        with open(os.path.join(root, f"toy_{name}.yaml"), "w") as f:
            f.write(f"task: toy_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(path)}\n"
                    f"test_split: test\noutput_type: {output_type}\n{rest}")
    return root
