"""Plugins: pluggy hook specifications (`specs.py`), one plugin manager per engine (`manager.py`) and
the built-in plugins (`builtin.py`). Project name and entry-point group: `multilora_plugin`.
See docs/hooks.md."""

from .builtin import AdapterDirectory, EngineStatistics
from .manager import ENTRY_POINT_GROUP, AdapterRegistry, Plugins
from .specs import hookimpl, hookspec

__all__ = ["ENTRY_POINT_GROUP", "AdapterDirectory", "AdapterRegistry", "EngineStatistics", "Plugins", "hookimpl",
           "hookspec"]
