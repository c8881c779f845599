"""multilora_plugin: serve many LoRA adapters on one Hugging Face model, mixed in one batch.

    model = multilora_plugin.wrap(hf_model, max_loras=4)
    model.load_adapter("sql", "adapters/sql")      # or register_adapter: read on first use
    out = model.generate(input_ids, attention_mask=mask, adapter_names=["sql", None])

    llm = multilora_plugin.LLM(model, tokenizer)  # continuous batching, adapter-aware scheduling
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=64), lora_request=[...])
"""

from .adapters import EMPTY, AdapterEvent, AdapterState, CacheStats
from .config import MultiLoRAConfig
from .engine import Engine
from .errors import (
    AdapterExistsError,
    AdapterLoadError,
    AdapterNotFoundError,
    CapacityError,
    ConfigError,
    IncompatibleAdapterError,
    InvalidRequestError,
    KernelInputError,
    MultiLoRAError,
    OverloadedError,
    PluginError,
    RequestRejected,
    UnavailableError,
    WrapError,
)
from .hooks import hookimpl
from .layers import MultiLoRALinear
from .llm import LLM
from .mapping import BatchMapping
from .outputs import (
    CompletionOutput,
    EngineRequest,
    EngineStats,
    LoRARequest,
    RequestOutput,
    StepStats,
)
from .sampling import SamplingParams
from .scheduler import SchedulerConfig
from .wrap import BASE_MODEL, AdapterInfo, MultiLoRAModel, wrap

__version__ = "0.1.0"

__all__ = [
    "BASE_MODEL",
    "EMPTY",
    "AdapterExistsError",
    "AdapterInfo",
    "AdapterEvent",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "AdapterState",
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
