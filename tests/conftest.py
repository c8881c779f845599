"""Shared fixtures: tiny random models and real PEFT adapter directories, built once per session."""

from __future__ import annotations

import copy
import importlib.util
import os
import re

import torch

if not torch.cuda.is_available():  # run the Triton kernels on CPU tensors; read by triton at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from multilora_plugin import toy  # noqa: E402

torch.set_num_threads(2)

TRITON_MISSING = importlib.util.find_spec("triton") is None


def backend_names() -> list:
    """`wrap(backend=...)` values that can run here, as pytest params."""
    return ["torch", pytest.param("triton", marks=[pytest.mark.slow,  # Triton's interpreter, on CPU
                                                   pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed")])]


def kernel_backends() -> list:
    """Every kernel backend that can run here: torch always, Triton where it imports."""
    from multilora_plugin.kernels import TorchBackend

    backends = [pytest.param(TorchBackend(), id="torch")]
    if TRITON_MISSING:
        backends.append(pytest.param(None, id="triton", marks=pytest.mark.skip(reason="triton is not installed")))
    else:
        from multilora_plugin.kernels.triton_ops import TritonBackend

        backends.append(pytest.param(TritonBackend(), id="triton", marks=pytest.mark.slow))  # the interpreter, on CPU
    return backends


def adapter_specs(arch: str) -> dict:
    """Four adapters that differ in rank, alpha, scaling rule and target set (list, regex, layers)."""
    attn, mlp = toy.PROJECTIONS[arch]
    first_layer_regex = rf".*\.0\..*({re.escape(attn[0])}|{re.escape(mlp[-1])})$"
    common = dict(fan_in_fan_out=arch == "gpt2")  # Conv1D stores weights [in, out]
    return {
        "all4": dict(r=4, lora_alpha=8, target_modules="all-linear", seed=1, **common),
        "attn8_rs": dict(r=8, lora_alpha=32, target_modules=list(attn), use_rslora=True, seed=2, **common),
        "mlp16_l1": dict(r=16, lora_alpha=16, target_modules=list(mlp), layers_to_transform=[1], seed=3, **common),
        "regex_pat": dict(r=8, lora_alpha=16, target_modules=first_layer_regex, seed=4,
                          rank_pattern={attn[0]: 2}, alpha_pattern={mlp[-1]: 4}, **common),
    }


class ArchKit:
    """A base model of one architecture, its adapters on disk, and fresh copies on demand."""

    def __init__(self, arch: str, root):
        self.arch = arch
        self.base = toy.tiny_model(arch)
        self.paths = {
            name: toy.make_adapter(self.base, root / name, **spec) for name, spec in adapter_specs(arch).items()
        }

    def fresh(self):
        return copy.deepcopy(self.base)

    def wrapped(self, **wrap_kwargs):
        import multilora_plugin

        model = multilora_plugin.wrap(self.fresh(), **wrap_kwargs)
        for name, path in self.paths.items():
            model.load_adapter(name, path)
        return model

    def peft(self, name: str):
        from peft import PeftModel

        return PeftModel.from_pretrained(self.fresh(), self.paths[name]).eval()

    def greedy(self, adapter, prompt, new_tokens: int) -> list:
        """The oracle: the tokens PEFT generates greedily for `prompt` alone with `adapter` (None: the base)."""
        model = self.peft(adapter) if adapter else self.fresh().eval()
        ids = torch.tensor([list(prompt)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()


_KITS: dict = {}


@pytest.fixture(scope="session")
def kit_factory(tmp_path_factory):
    def get(arch: str) -> ArchKit:
        if arch not in _KITS:
            _KITS[arch] = ArchKit(arch, tmp_path_factory.mktemp(f"adapters_{arch}"))
        return _KITS[arch]

    return get


@pytest.fixture(scope="session")
def llama_kit(kit_factory) -> ArchKit:
    return kit_factory("llama")


def padded_batch(rows: int, lengths, vocab: int = 128, seed: int = 0):
    """Left-padded random prompts: input_ids and attention_mask of shape [rows, max(lengths)]."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(4, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask
