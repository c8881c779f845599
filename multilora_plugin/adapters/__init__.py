"""Adapters: PEFT checkpoints → sources (registry) → CPU tier → GPU slots (cache)."""

from .cache import AdapterCache, AdapterEvent, AdapterState, CacheStats
from .checkpoint import AdapterWeights, ModelModules, ModuleWeights, read_adapter, read_config
from .registry import BASE_MODEL, AdapterSource, check_name, read_source
from .slots import EMPTY, SlotTable

__all__ = [
    "BASE_MODEL",
    "EMPTY",
    "AdapterCache",
    "AdapterEvent",
    "AdapterSource",
    "AdapterState",
    "AdapterWeights",
    "CacheStats",
    "ModelModules",
    "ModuleWeights",
    "SlotTable",
    "check_name",
    "read_adapter",
    "read_config",
    "read_source",
]
