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

from .app import RayServeArgs, build_app
from .ingress import Ingress, RayBackend, RayStream
from .replica import LoRAReplica, ReplicaMetrics

__all__ = ["RayServeArgs", "build_app", "Ingress", "RayBackend", "RayStream", "LoRAReplica", "ReplicaMetrics"]
