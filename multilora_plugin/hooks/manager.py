"""One pluggy `PluginManager` per engine, and the calls the engine makes through it.

Plugins come from the entry-point group `multilora_plugin` (unless `load_entrypoints=False`) and
from `Engine(..., plugins=[...])`. How a failing plugin is contained depends on the hook:

    observation hooks (register_adapters, batch_scheduled, adapter_loaded / evicted,
    request_finished, step_finished)   each implementation is called on its own; an exception is
                                       logged and counted in `Plugins.errors`, the others still run
    request_received                   `RequestRejected` reaches the caller; any other exception
                                       becomes a `PluginError` for that request alone
    resolve_adapter                    an exception becomes a `PluginError` for that request alone
    load_adapter_weights               an exception becomes an `AdapterLoadError` for that adapter:
                                       only the requests that need it fail
"""

from __future__ import annotations

import collections
import importlib.metadata
import logging
import os
from typing import Any, Iterable, Optional

import pluggy

from ..adapters import AdapterEvent, AdapterState
from ..errors import AdapterLoadError, MultiLoRAError, PluginError, RequestRejected
from . import specs

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = specs.PROJECT


class AdapterRegistry:
    """What `multilora_register_adapters` receives: registers adapters on the engine's model."""

    def __init__(self, model) -> None:
        self._model = model

    def add(self, name: str, path: "str | os.PathLike", *, replace: bool = False) -> None:
        """Register the PEFT adapter directory `path` under `name` (its weights are read on first use)."""
        if replace and name in self:
            self._model.load_adapter(name, path, replace=True)
        else:
            self._model.register_adapter(name, path)

    def __contains__(self, name: object) -> bool:
        return name in self._model.adapter_cache

    def names(self) -> list:
        return self._model.adapter_cache.names()


class Plugins:
    """The plugin manager of one engine. `errors` counts exceptions per (plugin, hook)."""

    def __init__(self, plugins: Iterable[Any] = (), *, load_entrypoints: bool = True) -> None:
        self.manager = pluggy.PluginManager(specs.PROJECT)
        self.manager.add_hookspecs(specs)
        self.errors: collections.Counter = collections.Counter()
        if load_entrypoints:
            self._load_entrypoints()
        for plugin in plugins:
            self.register(plugin)

    def register(self, plugin: Any, name: Optional[str] = None) -> str:
        """Add a plugin (an object or module with `hookimpl`-marked functions); returns its name
        (default: the module's or the class's name, numbered when taken)."""
        if name is None:
            base = getattr(plugin, "__name__", None) or type(plugin).__name__
            name = next(n for n in (base if i == 0 else f"{base}-{i}" for i in range(len(self.names()) + 1))
                        if self.manager.get_plugin(n) is None and not self.manager.is_blocked(n))
        try:
            return self.manager.register(plugin, name=name)
        except ValueError as exc:  # registered twice, or a name taken
            raise PluginError(f"plugin {name or plugin!r} cannot be registered: {exc}") from None
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name or plugin!r} does not match the hook specs: {exc}") from None

    def names(self) -> list:
        return [self.manager.get_name(p) for p in self.manager.get_plugins()]

    def _load_entrypoints(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.manager.get_plugin(ep.name) is not None or self.manager.is_blocked(ep.name):
                continue
            dist = getattr(ep.dist, "name", "?")
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
                raise PluginError(
                    f"the plugin {ep.name!r} (entry point {ep.name} = {ep.value} in group {ENTRY_POINT_GROUP!r}, "
                    f"distribution {dist!r}) failed to import: {type(exc).__name__}: {exc}"
                ) from exc
            self.register(plugin() if isinstance(plugin, type) else plugin, name=ep.name)

    # observation ------------------------------------------------------------------------------------
    def _implementations(self, hook_name: str) -> list:
        """A hook's implementations in pluggy's order (the latest registered first)."""
        return list(reversed(getattr(self.manager.hook, hook_name).get_hookimpls()))

    @staticmethod
    def _call(impl, kwargs: dict):
        """Call one implementation with the arguments it names (a subset of the hook's)."""
        return impl.function(*[kwargs[arg] for arg in impl.argnames])

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation of an observation hook on its own; failures are logged and counted."""
        for impl in self._implementations(hook_name):
            try:
                self._call(impl, kwargs)
            except Exception:  # noqa: BLE001 - an observer never stops the engine
                self.errors[(impl.plugin_name, hook_name)] += 1
                logger.exception("plugin %r failed in %s", impl.plugin_name, hook_name)

    _TIERS = {AdapterState.CPU: ("cpu",), AdapterState.ACTIVE: ("cpu", "gpu"), AdapterState.EVICTING: ("cpu", "gpu")}

    def adapter_event(self, event: AdapterEvent) -> None:
        """A cache listener: each state change → `multilora_adapter_loaded` / `multilora_adapter_evicted`, per tier."""
        old, new = self._TIERS.get(event.old, ()), self._TIERS.get(event.new, ())
        for tier in ("gpu", "cpu"):
            if tier in old and tier not in new:
                self.notify("multilora_adapter_evicted", name=event.name, tier=tier)
        for tier in ("cpu", "gpu"):
            if tier in new and tier not in old:
                self.notify("multilora_adapter_loaded", name=event.name, tier=tier,
                            slot=event.slot if tier == "gpu" else None)

    # decisions --------------------------------------------------------------------------------------
    def request_received(self, request: Any) -> None:
        for impl in self._implementations("multilora_request_received"):
            try:
                self._call(impl, {"request": request})
            except MultiLoRAError:  # RequestRejected, or an error of ours raised on purpose: the caller's
                raise
            except Exception as exc:  # noqa: BLE001
                self.errors[(impl.plugin_name, "multilora_request_received")] += 1
                raise PluginError(f"request {request.request_id!r} failed in plugin {impl.plugin_name!r} "
                                  f"(multilora_request_received): {type(exc).__name__}: {exc}") from exc

    def resolve_adapter(self, name: str) -> Optional[str]:
        try:
            path = self.manager.hook.multilora_resolve_adapter(name=name)
        except MultiLoRAError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.errors[("?", "multilora_resolve_adapter")] += 1
            raise PluginError(f"resolving adapter {name!r} failed in a plugin: {type(exc).__name__}: {exc}") from exc
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise PluginError(f"multilora_resolve_adapter should return a path or None, but returned "
                              f"{type(path).__name__} for adapter {name!r}")
        return None if path is None else os.fspath(path)

    def load_adapter_weights(self, source: Any):
        try:
            return self.manager.hook.multilora_load_adapter_weights(source=source)
        except MultiLoRAError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.errors[("?", "multilora_load_adapter_weights")] += 1
            raise AdapterLoadError(f"adapter {source.name!r}: a plugin failed to provide its weights: "
                                   f"{type(exc).__name__}: {exc}") from exc


__all__ = ["ENTRY_POINT_GROUP", "AdapterRegistry", "Plugins", "RequestRejected"]
