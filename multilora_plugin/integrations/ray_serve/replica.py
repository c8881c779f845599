"""The engine replicas of the Ray Serve application: `LoRAReplica` (one `Engine` each; the adapter is
Serve's multiplexed model id) and the metrics it records in Ray's metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, List, Optional

from ...adapters import AdapterState
from ...async_engine import AsyncEngine
from ...errors import AdapterNotFoundError, MultiLoRAError
from ...hooks import hookimpl
from ...sampling import SamplingParams
from ..engine_args import EngineArgs
from ..metrics import LATENCY_BUCKETS, REQUEST_METRICS, engine_samples, finished_request_samples
from ..protocol import describe_model

logger = logging.getLogger(__name__)

METRICS_PERIOD_S = 2.0  # how often a replica records the engine's gauges and counters


# the replicas ----------------------------------------------------------------------------------------
class LoRAReplica:
    """One engine. Ray Serve runs `replicas` of these (see the module docstring)."""

    def __init__(self, engine_args: EngineArgs, max_concurrent_requests: int = 256) -> None:
        from ray import serve

        self.engine = engine_args.build()
        self.model = self.engine.model
        self.async_engine = AsyncEngine(self.engine, max_concurrent_requests=max_concurrent_requests)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = ReplicaMetrics(self.engine, in_flight=lambda: self.async_engine.num_requests)
        self._refresher: Optional[asyncio.Task] = None

        async def bring_in(adapter: str) -> _Resident:
            await asyncio.wrap_future(self.model.prefetch([adapter])[adapter])  # typed errors if it cannot load
            return _Resident(self.model, adapter)

        # Serve's LRU of the adapters here decides, for routing, which ones this replica holds; the
        # CPU tier of the engine's cache has the same bound and drops what Serve drops, so the two agree
        self._loaded = serve.multiplexed(max_num_models_per_replica=self.model.adapter_cache.max_cpu_loras)(bring_in)
        self._registering = asyncio.Lock()

    async def generate(self, request_id: str, prompt: Optional[str], prompt_token_ids: List[int],
                       params: SamplingParams, adapter_path: Optional[str], metadata: Dict[str, Any],
                       stream: bool = True):
        """Stream one request: first (this replica, whether its adapter was already in memory
        here), then its outputs (only the finished one when not `stream`). Typed errors (bad
        request, adapter that cannot load, overload) are raised before anything is yielded."""
        from ray import serve

        self._start_metrics()
        adapter = serve.get_multiplexed_model_id() or None
        resident = None
        if adapter is not None:
            resident = await self._adapter_here(adapter, adapter_path)
        outputs = await self.async_engine.add_request(request_id, prompt, params, adapter,
                                                      prompt_token_ids=prompt_token_ids, metadata=metadata)
        try:
            yield self.replica, resident
            async for output in outputs:
                if stream or output.finished:
                    yield output
        finally:
            outputs.abort()  # cancelled by the caller (client gone): free the request now

    async def load(self, adapter: str, path: str) -> dict:
        """Register and read an adapter here (the multiplexed id is `adapter`): the full check of
        `/v1/load_lora_adapter`. Raises what `MultiLoRAModel.load_adapter` would."""
        await self._adapter_here(adapter, path)
        return {"replica": self.replica, "adapter": adapter, "rank": self.model.adapter_cache.source(adapter).rank}

    async def describe(self) -> dict:
        """What the ingress needs to know about the model."""
        return {"max_model_len": self.engine.max_model_len, **describe_model(self.model)}

    async def _adapter_here(self, adapter: str, path: Optional[str]) -> bool:
        """Register `adapter` from `path` if this replica does not know it (or knows another
        directory under that name), then let Serve's loader bring it into memory. Returns whether
        it was in memory already."""
        cache = self.model.adapter_cache
        if path is None:
            raise AdapterNotFoundError(f"adapter {adapter!r} is not registered")
        async with self._registering:
            if adapter not in cache:
                await asyncio.to_thread(self.model.register_adapter, adapter, path)
            elif cache.source(adapter).path != path:  # a new directory under a reused name
                await asyncio.to_thread(self.model.load_adapter, adapter, path, replace=True)
        resident = cache.state(adapter) in (AdapterState.CPU, AdapterState.ACTIVE)
        await self._loaded(adapter)
        return resident

    def _start_metrics(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._record_metrics())

    async def _record_metrics(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.metrics.record_engine)
            except Exception:  # noqa: BLE001 - metrics never take the replica down
                logger.exception("recording the engine's metrics failed")
            await asyncio.sleep(METRICS_PERIOD_S)

    def __del__(self) -> None:  # Serve stops the replica
        if getattr(self, "_refresher", None) is not None:
            self._refresher.cancel()
        if getattr(self, "engine", None) is not None:
            self.engine.close()


class _Resident:
    """An adapter in a replica's memory, as Serve's multiplexing holds it: when Serve drops it (its
    least recently used, to make room), `__del__` frees its memory in the engine too, unless a
    running batch uses it (the engine's own LRU then takes it later)."""

    def __init__(self, model, name: str) -> None:
        self.model, self.name, self.dropped = model, name, False

    def __del__(self) -> None:  # Serve calls it on eviction; the garbage collector later finds it done
        if self.dropped:
            return
        self.dropped = True
        try:
            self.model.evict_adapter(self.name)
        except MultiLoRAError:  # unloaded meanwhile
            pass


class ReplicaMetrics:
    """The engine's series (`integrations.metrics`) in Ray's metrics, which tag them with the
    deployment and replica: per-request series as requests end, the engine's gauges and counters
    every `METRICS_PERIOD_S` (`record_engine`)."""

    def __init__(self, engine, *, in_flight=None) -> None:
        from ray.serve import metrics

        self._metrics = metrics
        self.engine = engine
        self.in_flight = in_flight
        self.series = {}
        for key, spec in REQUEST_METRICS.items():
            if spec.kind == "histogram":
                self.series[key] = metrics.Histogram(spec.name, spec.documentation, boundaries=list(LATENCY_BUCKETS),
                                                     tag_keys=spec.labels)
            else:
                self.series[key] = metrics.Counter(spec.name, spec.documentation, tag_keys=spec.labels)
        self._engine_series: Dict[str, Any] = {}
        self._last: Dict[tuple, float] = {}  # counters' values at the last record
        engine.plugins.register(self, name="ray-metrics")

    @hookimpl
    def multilora_request_finished(self, request, output) -> None:
        for key, labels, value in finished_request_samples(request, output):
            spec = REQUEST_METRICS[key]
            tags = dict(zip(spec.labels, labels))
            if spec.kind == "histogram":
                self.series[key].observe(value, tags=tags)
            else:
                self.series[key].inc(value, tags=tags)

    def record_engine(self) -> None:
        for spec, values in engine_samples(self.engine, self.in_flight):
            metric = self._engine_series.get(spec.name)
            if metric is None:
                kind = self._metrics.Counter if spec.kind == "counter" else self._metrics.Gauge
                metric = self._engine_series[spec.name] = kind(spec.name, spec.documentation, tag_keys=spec.labels)
            for labels, value in values:
                tags = dict(zip(spec.labels, labels))
                if spec.kind == "counter":
                    key = (spec.name, labels)
                    delta = value - self._last.get(key, 0)
                    self._last[key] = value
                    if delta > 0:
                        metric.inc(delta, tags=tags)
                else:
                    metric.set(value, tags=tags)
