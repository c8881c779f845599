"""`EngineBackend`: the HTTP routes' backend (`integrations.backend`) for an `Engine` in the server's
process, stepped by an `AsyncEngine` thread."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..async_engine import AsyncEngine, RequestStream
from ..engine import Engine
from ..errors import ConfigError
from ..sampling import SamplingParams
from .metrics import EngineMetrics
from .protocol import describe_model, model_name


class EngineBackend:
    """The routes' view of one engine in this process (`integrations.ray_serve` has another: replicas
    behind Ray Serve). A backend queues requests and returns their streams, names and loads adapters,
    and describes the model."""

    def __init__(self, engine: Engine, *, max_concurrent_requests: int = 256) -> None:
        if not isinstance(engine, Engine):
            raise ConfigError(f"expected a multilora_plugin Engine, but got {type(engine).__name__}")
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.async_engine = AsyncEngine(engine, max_concurrent_requests=max_concurrent_requests)
        self.metrics = EngineMetrics(engine, in_flight=lambda: self.async_engine.num_requests)
        self.default_model_name = model_name(engine.model)

    @property
    def max_concurrent_requests(self) -> int:
        return self.async_engine.max_concurrent_requests

    async def start(self) -> None:
        self.async_engine.start()

    async def stop(self) -> None:
        await self.async_engine.stop()

    async def unhealthy(self) -> Optional[str]:
        """Why the backend cannot serve now, or None."""
        return None if self.async_engine.running else "the engine's step loop is not running"

    async def submit(self, request_id: str, text: Optional[str], ids: List[int], params: SamplingParams,
                     adapter: Optional[str], metadata: Dict[str, Any], stream: bool = True) -> RequestStream:
        """Queue one request; raises the engine's typed errors before returning its stream (which,
        with `stream=False`, need only deliver the finished output)."""
        return await self.async_engine.add_request(request_id, text, params, adapter, prompt_token_ids=ids,
                                                   metadata=metadata)

    def adapters(self) -> Dict[str, str]:
        """Adapter name → its directory, for every adapter that can be named."""
        return self.model.adapter_cache.paths()

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> None:
        await self.async_engine.call(self.model.load_adapter, name, path, replace=replace)

    async def unload_adapter(self, name: str) -> None:
        await self.async_engine.call(self.model.unload_adapter, name)

    def describe(self) -> dict:
        return describe_model(self.model)

    metrics_elsewhere = None

    async def render_metrics(self) -> bytes:
        return await self.async_engine.call(self.metrics.render)
