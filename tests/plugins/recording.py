"""A plugin that records every hook call, in order, with its arguments."""

from multilora_plugin import hookimpl


class Recorder:
    def __init__(self):
        self.calls = []

    def names(self, *hooks):
        return [c for c in self.calls if not hooks or c[0] in hooks]

    @hookimpl
    def multilora_register_adapters(self, registry):
        self.calls.append(("register_adapters", tuple(registry.names())))

    @hookimpl
    def multilora_request_received(self, request):
        self.calls.append(("request_received", request.request_id, request.adapter))

    @hookimpl
    def multilora_batch_scheduled(self, scheduler_output):
        self.calls.append(("batch_scheduled", scheduler_output.step,
                           tuple(r.request_id for r in scheduler_output.prefill)))

    @hookimpl
    def multilora_adapter_loaded(self, name, tier, slot):
        self.calls.append(("adapter_loaded", name, tier, slot))

    @hookimpl
    def multilora_adapter_evicted(self, name, tier):
        self.calls.append(("adapter_evicted", name, tier))

    @hookimpl
    def multilora_request_finished(self, request, output):
        self.calls.append(("request_finished", request.request_id, output.outputs[0].finish_reason))

    @hookimpl
    def multilora_step_finished(self, stats):
        self.calls.append(("step_finished", stats.step, stats.generated_tokens, stats.finished))
