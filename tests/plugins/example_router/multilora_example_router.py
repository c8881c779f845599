"""An installable multilora_plugin plugin, found through the `multilora_plugin` entry-point group.

It registers every adapter under the directory named by $MULTILORA_EXAMPLE_ADAPTERS when an engine
starts, and routes each request to the adapter named by its `metadata["task"]` (requests without a
task keep the adapter they asked for; a task without an adapter is rejected).
"""

import os

import multilora_plugin


class TaskRouter:
    def __init__(self):
        self.root = os.environ.get("MULTILORA_EXAMPLE_ADAPTERS")

    @multilora_plugin.hookimpl
    def multilora_register_adapters(self, registry):
        if not self.root:
            return
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            if os.path.isfile(os.path.join(path, "adapter_config.json")) and name not in registry:
                registry.add(name, path)

    @multilora_plugin.hookimpl
    def multilora_request_received(self, request):
        task = request.metadata.get("task")
        if task is None:
            return
        if self.root is None or not os.path.isdir(os.path.join(self.root, task)):
            raise multilora_plugin.RequestRejected(f"no adapter serves task {task!r}")
        request.adapter = task
