"""Serve on Ray Serve: engine replicas, with requests routed to the replica that holds their adapter.

    multilora serve --ray --replicas 2 --model PATH --adapter sql=PATH ...
    serve run multilora_plugin.integrations.ray_serve:build_app model=PATH replicas=2 adapters=sql=PATH
    serve.run(build_app({"model": PATH, "replicas": 2, "adapters": {"sql": PATH}}))     # from Python

Two deployments:

* `LoRAReplica` (`replicas` of them): one `Engine` each, built from the same `EngineArgs`. Its
  `generate` streams a request's `RequestOutput`s. The adapter is Ray Serve's *multiplexed model
  id*: `serve.get_multiplexed_model_id()` names it, and a `@serve.multiplexed` loader brings it
  into the replica's CPU memory (registering it from its directory the first time). Serve then
  routes later requests for that adapter to the replicas that report it loaded (each keeps up to
  `max_cpu_loras`, its least recently used dropped first), and places an adapter nobody holds on
  the replica that holds the fewest. Below that, the engine's slots and caches work as in one
  process.
* `Ingress` (one replica): the same FastAPI app as `multilora serve` (`server.create_app`), over a
  `RayBackend` instead of a local engine. It tokenizes, applies chat templates and builds both APIs'
  answers exactly as the single-process server does; it keeps the adapter catalog (name → directory)
  and sends each request to the replicas with `handle.options(multiplexed_model_id=adapter,
  stream=True)`.

Errors: a replica's typed errors reach the client as the single-process server would send them (an
adapter that fails to load fails its requests with the same status and message). A replica that
dies fails the requests it was serving with `UnavailableError` (HTTP 503, or an error event in a
stream); Serve starts a new replica and later requests succeed.

Metrics: each replica records the engine's series (`integrations.metrics`) in Ray's metrics,
tagged with `deployment` and `replica`, next to Ray Serve's own (`ray_serve_*`, among them the
multiplexed model loads); Ray's Prometheus endpoint on each node exports them as
`ray_multilora_*`. The ingress's `/metrics` says so (404).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..adapters import AdapterState, not_registered
from ..async_engine import AsyncEngine
from ..errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    InvalidRequestError,
    MultiLoRAError,
    OverloadedError,
    UnavailableError,
)
from ..hooks import hookimpl
from ..hooks.builtin import AdapterDirectory
from ..sampling import SamplingParams
from .access import AccessPolicy
from .engine_args import EngineArgs, parse_adapter
from .metrics import LATENCY_BUCKETS, REQUEST_METRICS, engine_samples, finished_request_samples
from .server import GenerationFailed, create_app, describe_model

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


# the ingress -----------------------------------------------------------------------------------------
class RayStream:
    """One request's outputs from a replica: iterate it; `abort()` cancels it there."""

    def __init__(self, request_id: str, generator, on_close) -> None:
        self.request_id = request_id
        self._generator = generator
        self._on_close = on_close
        self.finished = False
        self.replica: Optional[str] = None
        self.resident: Optional[bool] = None

    async def open(self) -> "RayStream":
        """Wait until a replica accepted the request (its typed errors are raised here)."""
        try:
            self.replica, self.resident = await self._generator.__anext__()
        except BaseException as exc:
            self.abort()
            raise _translated(exc, self.request_id) from None
        return self

    @property
    def headers(self) -> Dict[str, str]:
        headers = {"x-multilora-replica": self.replica or ""}
        if self.resident is not None:
            headers["x-multilora-adapter-resident"] = "true" if self.resident else "false"
        return headers

    async def __aiter__(self):
        try:
            while not self.finished:
                try:
                    output = await self._generator.__anext__()
                except StopAsyncIteration:
                    raise UnavailableError(f"the replica serving request {self.request_id} ended its stream "
                                           "before the request finished") from None
                except Exception as exc:  # noqa: BLE001 - translated to the client's terms
                    raise _translated(exc, self.request_id) from None
                self.finished = output.finished
                yield output
        finally:
            if not self.finished:
                self.abort()
            self._close()

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._generator.cancel()
        self._close()

    def _close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


def _translated(exc: BaseException, request_id: str) -> BaseException:
    """An error from Ray as the single-process server would raise it."""
    import ray.exceptions
    import ray.serve.exceptions

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, MultiLoRAError):
            return cause
        return GenerationFailed(f"request {request_id} failed on its replica: {type(cause).__name__}: {cause}")
    if isinstance(exc, ray.serve.exceptions.BackPressureError):
        return OverloadedError(f"every replica is at its request limit; retry later ({exc})")
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.serve.exceptions.ReplicaUnavailableError,
                        ray.serve.exceptions.DeploymentUnavailableError)):
        return UnavailableError(f"the replica serving request {request_id} stopped ({type(exc).__name__}); "
                                "Serve replaces it, retry the request")
    return exc


class RayBackend:
    """The HTTP routes' backend (see `server.EngineBackend`) on a handle to the `LoRAReplica`
    deployment. It keeps the adapter catalog, name → directory."""

    def __init__(self, replicas, engine_args: EngineArgs, *, max_concurrent_requests: int = 256) -> None:
        self.replicas = replicas
        self.engine_args = engine_args
        self.tokenizer = engine_args.load_tokenizer()
        self.default_model_name = engine_args.model_name
        self.max_concurrent_requests = max_concurrent_requests
        self.max_model_len: Optional[int] = None
        self.directory = AdapterDirectory(engine_args.adapter_dir) if engine_args.adapter_dir else None
        found = self.directory.found() if self.directory is not None else {}
        self.catalog: Dict[str, str] = {**found, **engine_args.adapters}
        self.in_flight = 0
        self._description: dict = {}

    async def start(self) -> None:
        self._description = await self.replicas.describe.remote()
        self.max_model_len = self._description.pop("max_model_len")

    async def stop(self) -> None:
        pass

    async def unhealthy(self) -> Optional[str]:
        return None  # Serve checks the replicas' health and replaces those that fail

    def adapters(self) -> Dict[str, str]:
        return dict(self.catalog)

    def describe(self) -> dict:
        return dict(self._description)

    async def render_metrics(self) -> Optional[bytes]:
        return None  # see `metrics_elsewhere`

    metrics_elsewhere = ("with Ray Serve, each replica records its metrics in Ray's metrics (ray_multilora_*, "
                         "tagged with the replica), next to Serve's own (ray_serve_*): scrape Ray's metrics "
                         "endpoint on each node (ray start --metrics-export-port)")

    async def submit(self, request_id: str, text: Optional[str], ids: List[int], params: SamplingParams,
                     adapter: Optional[str], metadata: Dict[str, Any], stream: bool = True) -> RayStream:
        path = None if adapter is None else self._path(adapter)
        if self.in_flight >= self.max_concurrent_requests:
            raise OverloadedError(f"the server holds {self.in_flight} requests, its limit "
                                  f"(max_concurrent_requests={self.max_concurrent_requests}); retry later")
        self.in_flight += 1
        try:
            generator = self.replicas.options(stream=True, multiplexed_model_id=adapter or "").generate.remote(
                request_id, text, ids, params, path, metadata, stream)
        except BaseException:
            self._release()
            raise
        return await RayStream(request_id, generator, self._release).open()

    def _release(self) -> None:
        self.in_flight -= 1

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> None:
        """Read the adapter on one replica (the full check a local `load_adapter` makes), then
        serve it; other replicas read it when Serve first sends them its requests. Replacing an
        adapter in place is refused: the replicas that hold the old files would go on serving them."""
        if replace:
            raise InvalidRequestError(f"replacing adapter {name!r} in place is not supported on Ray Serve (replicas "
                                      "that hold the old version would keep serving it); load it under a new name")
        if name in self.catalog:
            raise AdapterExistsError(f"an adapter named {name!r} is already registered (from "
                                     f"{self.catalog[name]!r}); unload it first, pick another name, or pass replace=True")
        path = os.fspath(path)
        try:
            await self.replicas.options(multiplexed_model_id=name).load.remote(name, path)
        except Exception as exc:  # noqa: BLE001 - translated
            raise _translated(exc, f"load_lora_adapter({name!r})") from None
        self.catalog[name] = path

    async def unload_adapter(self, name: str) -> None:
        """Forget the adapter here: new requests cannot name it. Requests already running finish;
        replicas drop its weights as their caches need the room."""
        if name not in self.catalog:
            raise AdapterNotFoundError(not_registered(name, self.catalog))
        del self.catalog[name]

    def _path(self, name: str) -> str:
        path = self.catalog.get(name)
        if path is None and self.directory is not None:
            path = self.directory.path_of(name)
            if path is not None:
                self.catalog[name] = path
        if path is None:  # worded as the engine words it
            raise AdapterNotFoundError(not_registered(name, self.catalog) + "; give its lora_path to register it")
        return path


class Ingress:
    """The HTTP routes of `multilora serve` over the replicas (`serve.ingress` builds the app on
    the replica from `__serve_build_asgi_app__`)."""

    def __init__(self, replicas, engine_args: EngineArgs, max_concurrent_requests: int = 256,
                 access: Optional[dict] = None) -> None:
        self.backend = RayBackend(replicas, engine_args, max_concurrent_requests=max_concurrent_requests)
        self.access = AccessPolicy(**(access or {}))

    def __serve_build_asgi_app__(self):
        return create_app(self.backend, served_model_name=self.backend.default_model_name, access=self.access)


# building the application ----------------------------------------------------------------------------
class RayServeArgs(BaseModel):
    """The arguments of `build_app`: `EngineArgs`' fields and the deployment's. From `serve run
    module:build_app key=value ...`, every value is a string; `adapters` is then
    `name=path,name=path`."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    tokenizer: Optional[str] = None
    adapters: Dict[str, str] = Field(default_factory=dict)
    adapter_dir: Optional[str] = None
    max_loras: int = Field(4, ge=1)
    max_lora_rank: int = Field(16, ge=1)
    max_cpu_loras: Optional[int] = Field(None, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_model_len: Optional[int] = Field(None, ge=2)
    dtype: str = "auto"
    device: Optional[str] = None
    served_model_name: Optional[str] = None
    cpu_threads: Optional[int] = Field(None, ge=1)
    replicas: int = Field(1, ge=1, description="engine replicas (one per GPU, or per group of CPU cores)")
    replica_cpus: float = Field(1.0, ge=0)
    replica_gpus: Optional[float] = Field(None, ge=0, description="default: 1 when the device is cuda")
    max_concurrent_requests: int = Field(256, ge=1, description="requests held at once by the ingress and "
                                         "by each replica")
    # what clients may do (integrations.access.AccessPolicy)
    allow_runtime_lora_updates: bool = False
    adapter_roots: List[str] = Field(default_factory=list)
    api_key: Optional[str] = None
    max_request_chars: int = Field(1_000_000, ge=1)

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters(cls, value):
        if isinstance(value, str):  # name=path,name=path
            return dict(parse_adapter(item) for item in value.split(",") if item)
        return value

    def engine_args(self) -> EngineArgs:
        fields = {f.name for f in dataclasses.fields(EngineArgs)}
        return EngineArgs(**{k: v for k, v in self.model_dump().items() if k in fields})


def build_app(args: Union[RayServeArgs, dict, None] = None):
    """The Ray Serve application: `Ingress` (HTTP) bound to `replicas` of `LoRAReplica`. `args` as
    `RayServeArgs` (or a dict of its fields); it is also the application builder of `serve run`."""
    from ray import serve

    settings = args if isinstance(args, RayServeArgs) else RayServeArgs.model_validate(args or {})
    engine_args = settings.engine_args()
    gpus = settings.replica_gpus
    if gpus is None:  # a GPU each for cuda; without a device named, when the cluster has GPUs
        if settings.device is None:
            import ray

            gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        else:
            gpus = 1.0 if settings.device.startswith("cuda") else 0.0
    limit = settings.max_concurrent_requests
    replica = serve.deployment(
        LoRAReplica, name="LoRAReplica", num_replicas=settings.replicas, max_ongoing_requests=limit,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": gpus})
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", num_replicas=1, max_ongoing_requests=limit,
                               ray_actor_options={"num_cpus": 0})
    access = {k: getattr(settings, k) for k in ("allow_runtime_lora_updates", "api_key", "max_request_chars")}
    access["adapter_roots"] = tuple(settings.adapter_roots)
    return ingress.bind(replica.bind(engine_args, limit), engine_args, limit, access)


__all__ = ["build_app", "RayServeArgs", "LoRAReplica", "Ingress", "RayBackend", "RayStream", "ReplicaMetrics"]
