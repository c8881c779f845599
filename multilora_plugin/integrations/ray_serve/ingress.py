"""The ingress of the Ray Serve application: the same FastAPI app as `multilora serve`, over a
`RayBackend` that sends each request to the replicas holding its adapter."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from ...adapters import not_registered
from ...errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    GenerationFailed,
    InvalidRequestError,
    MultiLoRAError,
    OverloadedError,
    UnavailableError,
)
from ...hooks.builtin import AdapterDirectory
from ...sampling import SamplingParams
from ..access import AccessPolicy
from ..engine_args import EngineArgs
from ..server import create_app

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
    """The HTTP routes' backend (see `integrations.backend`) on a handle to the `LoRAReplica`
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
