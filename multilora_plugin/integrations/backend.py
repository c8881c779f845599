"""What the HTTP routes need from whatever runs the requests: the backend contract.

Four backends implement it, each checked against it by tests/test_layout.py:

    EngineBackend       (integrations.engine_backend)   this package's Engine, in the server's process
    EngineProcess       (integrations.engine_process)   the Engine in a process of its own
    TransformersBackend (integrations.cb_backend)       transformers' continuous batching
    RayBackend          (integrations.ray_serve)        Engine replicas behind Ray Serve

A request's stream (what `submit` returns) yields this package's `RequestOutput`s in order, the
last one finished (or raises the request's error), and `abort()` or leaving it early aborts the
request; `headers` (optional) are response headers to send with it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, runtime_checkable

from ..sampling import SamplingParams


@runtime_checkable
class Backend(Protocol):
    tokenizer: Any  # turns prompts into ids and chats into prompts (None: token ids only)
    default_model_name: str  # the base model's name in the OpenAI API, unless the operator gives one
    max_model_len: Optional[int]  # prompt + output tokens per request (None: unbounded)
    max_concurrent_requests: int  # requests held at once; one more is refused with OverloadedError (503)
    metrics_elsewhere: Optional[str]  # where the metrics are when `render_metrics` returns None

    async def start(self) -> None:
        """Start serving (the app's startup)."""

    async def stop(self) -> None:
        """Abort what runs and stop (the app's shutdown)."""

    async def unhealthy(self) -> Optional[str]:
        """Why it cannot serve now, or None."""

    def adapters(self) -> Dict[str, str]:
        """Adapter name → its directory, for every adapter a request may name."""

    def describe(self) -> dict:
        """The model's part of TGI's /info (dtype, device, max_loras, ...)."""

    async def submit(self, request_id: str, text: Optional[str], ids: List[int], params: SamplingParams,
                     adapter: Optional[str], metadata: Dict[str, Any], stream: bool = True) -> Any:
        """Queue one request and return its stream; a request that cannot run raises its typed error
        here, before any response starts. `stream=False`: only the finished output will be read."""

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> None:
        """Read and serve a PEFT adapter directory (`replace`: a new version under a served name)."""

    async def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter; running requests finish on it."""

    async def render_metrics(self) -> Optional[bytes]:
        """The Prometheus text of /metrics, or None (see `metrics_elsewhere`)."""
