"""multilora_plugin: serve many LoRA adapters on one Hugging Face model, mixed in one batch.

    model = multilora_plugin.wrap(hf_model, max_loras=4)
    model.load_adapter("sql", "adapters/sql")      # or register_adapter: read on first use
    out = model.generate(input_ids, attention_mask=mask, adapter_names=["sql", None])

    llm = multilora_plugin.LLM(model, tokenizer)  # continuous batching, adapter-aware scheduling
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=64), lora_request=[...])
"""

import importlib
from typing import TYPE_CHECKING

# Public names and the module that defines each. They are imported on first use (PEP 562), so that
# `import multilora_plugin` and the `multilora` command's --help need neither torch nor transformers.
_EXPORTS = {
    "EMPTY": "adapters", "AdapterEvent": "adapters", "AdapterState": "adapters", "CacheStats": "adapters",
    "MultiLoRAConfig": "config", "Engine": "engine", "hookimpl": "hooks", "MultiLoRALinear": "layers",
    "LLM": "llm", "BatchMapping": "mapping", "SamplingParams": "sampling", "SchedulerConfig": "scheduler",
    "BASE_MODEL": "adapters", "AdapterInfo": "model", "MultiLoRAModel": "model", "wrap": "wrapping",
    **dict.fromkeys(["CompletionOutput", "EngineRequest", "EngineStats", "LoRARequest", "RequestOutput",
                     "StepStats"], "outputs"),
    **dict.fromkeys(["AdapterExistsError", "AdapterLoadError", "AdapterNotFoundError", "AdapterTooLargeError",
                     "CapacityError",
                     "ConfigError", "IncompatibleAdapterError", "InvalidRequestError", "KernelInputError",
                     "MultiLoRAError", "OverloadedError", "PluginError", "RequestRejected", "UnavailableError",
                     "WrapError"], "errors"),
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'multilora_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported here
    from .adapters import EMPTY, AdapterEvent, AdapterState, CacheStats  # noqa: F401
    from .engine import Engine  # noqa: F401
    from .llm import LLM  # noqa: F401
    from .adapters import BASE_MODEL  # noqa: F401
    from .model import AdapterInfo, MultiLoRAModel  # noqa: F401
    from .wrapping import wrap  # noqa: F401

from .version import __version__  # noqa: E402

__all__ = [
    "BASE_MODEL",
    "EMPTY",
    "AdapterExistsError",
    "AdapterInfo",
    "AdapterEvent",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "AdapterState",
    "AdapterTooLargeError",
    "BatchMapping",
    "CacheStats",
    "CapacityError",
    "CompletionOutput",
    "ConfigError",
    "Engine",
    "EngineRequest",
    "EngineStats",
    "IncompatibleAdapterError",
    "InvalidRequestError",
    "KernelInputError",
    "LLM",
    "LoRARequest",
    "MultiLoRAConfig",
    "MultiLoRAError",
    "MultiLoRALinear",
    "MultiLoRAModel",
    "OverloadedError",
    "PluginError",
    "RequestOutput",
    "RequestRejected",
    "SamplingParams",
    "SchedulerConfig",
    "StepStats",
    "UnavailableError",
    "WrapError",
    "hookimpl",
    "wrap",
]
