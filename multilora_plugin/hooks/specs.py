"""The hook specifications: what a host application's plugin can implement.

A plugin is any object (or module) with functions named like the specs below, marked with
`multilora_plugin.hookimpl`. It may take any subset of a hook's arguments. Every hook is documented
in docs/hooks.md (a test keeps the two in step).

    class TenantRouter:
        @multilora_plugin.hookimpl
        def multilora_request_received(self, request):
            request.adapter = TENANT_ADAPTERS.get(request.metadata.get("tenant"))
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import pluggy

PROJECT = "multilora_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# adapters -------------------------------------------------------------------------------------------
@hookspec
def multilora_register_adapters(registry: Any) -> None:
    """Called once when an engine starts: add adapters with `registry.add(name, path)`.

    `registry` is an `AdapterRegistry`; `name in registry` tells what is registered already.
    """


@hookspec(firstresult=True)
def multilora_resolve_adapter(name: str) -> Optional[str]:
    """A request names adapter `name`, which nobody registered: return the path of a PEFT adapter
    directory to register it under that name, or None to let another plugin answer. The first
    non-None answer wins; with none, the request fails with `AdapterNotFoundError`."""


@hookspec(firstresult=True)
def multilora_load_adapter_weights(source: Any) -> Optional[Mapping[str, Any]]:
    """The weights of a registered adapter are needed (`source`: an `AdapterSource` with `name`,
    `path`, `config`, `version`). Return a PEFT state dict ({"...lora_A.weight": tensor, ...}, as in
    `adapter_model.safetensors`) from a custom store, or None to read `source.path`. May be called from
    a background thread (prefetch)."""


# requests -------------------------------------------------------------------------------------------
@hookspec
def multilora_request_received(request: Any) -> None:
    """A request arrives (`request`: an `EngineRequest`). Validate it, route it (set or change
    `request.adapter` or `request.priority`), or raise `RequestRejected` to refuse it: the caller of
    `add_request` gets that error. Any other exception fails this request alone."""


@hookspec
def multilora_request_finished(request: Any, output: Any) -> None:
    """A request ended (length, stop, abort or error); `output` is its final `RequestOutput`."""


# the engine -----------------------------------------------------------------------------------------
@hookspec
def multilora_batch_scheduled(scheduler_output: Any) -> None:
    """The scheduler decided a step (`scheduler_output`: a `SchedulerOutput`), before it runs."""


@hookspec
def multilora_adapter_loaded(name: str, tier: str, slot: Optional[int]) -> None:
    """An adapter entered a tier: `tier` "cpu" (read into CPU memory; `slot` None) or "gpu" (written
    into `slot`; the tier of slots is called "gpu" on every device)."""


@hookspec
def multilora_adapter_evicted(name: str, tier: str) -> None:
    """An adapter left a tier: "gpu" (its slot was given to another adapter) or "cpu" (its CPU copy
    was dropped: back on disk only)."""


@hookspec
def multilora_step_finished(stats: Any) -> None:
    """An engine step ended (`stats`: a `StepStats` with the step's numbers)."""
