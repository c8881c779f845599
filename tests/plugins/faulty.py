"""Plugins that fail in one hook each."""

from multilora_plugin import hookimpl


class Broken(Exception):
    pass


class FailsToObserve:
    """Raises in every observation hook."""

    @hookimpl
    def multilora_register_adapters(self, registry):
        raise Broken("register_adapters")

    @hookimpl
    def multilora_batch_scheduled(self, scheduler_output):
        raise Broken("batch_scheduled")

    @hookimpl
    def multilora_adapter_loaded(self, name, tier, slot):
        raise Broken("adapter_loaded")

    @hookimpl
    def multilora_adapter_evicted(self, name, tier):
        raise Broken("adapter_evicted")

    @hookimpl
    def multilora_request_finished(self, request, output):
        raise Broken("request_finished")

    @hookimpl
    def multilora_step_finished(self, stats):
        raise Broken("step_finished")


class FailsToRoute:
    """Raises on requests whose metadata says so: an unexpected error, or a rejection."""

    @hookimpl
    def multilora_request_received(self, request):
        if request.metadata.get("crash"):
            raise Broken("the router crashed")
        if request.metadata.get("reject"):
            from multilora_plugin import RequestRejected

            raise RequestRejected("tenant over quota")


class FailsToResolve:
    @hookimpl
    def multilora_resolve_adapter(self, name):
        raise Broken(f"the store is down (asked for {name})")


class FailsToLoad:
    """Provides no weights for one adapter but raises for it."""

    def __init__(self, name):
        self.name = name

    @hookimpl
    def multilora_load_adapter_weights(self, source):
        if source.name == self.name:
            raise Broken("object storage timed out")
        return None
