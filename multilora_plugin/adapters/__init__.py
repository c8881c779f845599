"""Adapters: reading PEFT checkpoints and placing them in slots."""

from .cache import EMPTY, SlotTable
from .checkpoint import AdapterWeights, ModelModules, ModuleWeights, read_adapter, read_config

__all__ = ["EMPTY", "AdapterWeights", "ModelModules", "ModuleWeights", "SlotTable", "read_adapter", "read_config"]
