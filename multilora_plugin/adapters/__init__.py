"""Adapters: PEFT checkpoints → sources (registry) → CPU tier → GPU slots (cache)."""

from .cache import AdapterCache
from .checkpoint import (
    AdapterWeights,
    ModelModules,
    ModuleWeights,
    files_fingerprint,
    read_adapter,
    read_config,
)
from .registry import BASE_MODEL, AdapterSource, check_name, read_source, requested_adapter
from .slots import EMPTY, SlotTable
from .state import AdapterEvent, AdapterState, CacheStats, Hold, not_registered

__all__ = [
    "BASE_MODEL",
    "requested_adapter",
    "EMPTY",
    "AdapterCache",
    "AdapterEvent",
    "AdapterSource",
    "AdapterState",
    "AdapterWeights",
    "CacheStats",
    "Hold",
    "ModelModules",
    "ModuleWeights",
    "SlotTable",
    "check_name",
    "files_fingerprint",
    "not_registered",
    "read_adapter",
    "read_config",
    "read_source",
]
