"""Building the Ray Serve application: its arguments (`RayServeArgs`: `EngineArgs`' fields, derived
from it, and the deployment's) and `build_app`, the builder of `serve run` and `multilora serve --ray`."""

from __future__ import annotations

import dataclasses
import typing
from typing import List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from ..engine_args import EngineArgs, parse_adapter
from .ingress import Ingress
from .replica import LoRAReplica


class _Deployment(BaseModel):
    """The deployment's own arguments, and what clients may do (`integrations.access.AccessPolicy`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    replicas: int = Field(1, ge=1, description="engine replicas (one per GPU, or per group of CPU cores)")
    replica_cpus: float = Field(1.0, ge=0)
    replica_gpus: Optional[float] = Field(None, ge=0, description="default: 1 when the device is cuda")
    max_concurrent_requests: int = Field(256, ge=1, description="requests held at once by the ingress and "
                                         "by each replica")
    allow_runtime_lora_updates: bool = False
    adapter_roots: List[str] = Field(default_factory=list)
    api_key: Optional[str] = None
    max_request_chars: int = Field(1_000_000, ge=1)

    @field_validator("adapters", mode="before", check_fields=False)
    @classmethod
    def _adapters(cls, value):
        if isinstance(value, str):  # name=path,name=path
            return dict(parse_adapter(item) for item in value.split(",") if item)
        return value

    @model_validator(mode="after")
    def _valid_engine_args(self):
        self.engine_args()  # EngineArgs checks its own fields (a ConfigError is a ValueError)
        return self

    def engine_args(self) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        return EngineArgs(**{k: v for k, v in self.model_dump().items() if k in names})


def _engine_fields() -> dict:
    hints = typing.get_type_hints(EngineArgs)
    fields = {}
    for f in dataclasses.fields(EngineArgs):
        default = Field(default_factory=f.default_factory) if f.default_factory is not dataclasses.MISSING \
            else f.default
        fields[f.name] = (hints[f.name], default)
    return fields


RayServeArgs = create_model("RayServeArgs", __base__=_Deployment, **_engine_fields())
RayServeArgs.__doc__ = """The arguments of `build_app`: `EngineArgs`' fields and the deployment's. From `serve run
module:build_app key=value ...`, every value is a string; `adapters` is then `name=path,name=path`."""


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
