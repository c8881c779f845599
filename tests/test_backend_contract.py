"""Every backend of the HTTP routes keeps the contract `integrations.backend.Backend` writes down:
each member there, coroutines where it has coroutines, the same parameters."""

from __future__ import annotations

import inspect

import pytest

from multilora_plugin.integrations.backend import Backend
from multilora_plugin.integrations.cb_backend import TransformersBackend
from multilora_plugin.integrations.engine_backend import EngineBackend
from multilora_plugin.integrations.engine_process import EngineProcess

BACKENDS = [EngineBackend, EngineProcess, TransformersBackend]
try:  # Ray is an extra
    from multilora_plugin.integrations.ray_serve import RayBackend

    BACKENDS.append(RayBackend)
except ImportError:  # pragma: no cover
    pass

METHODS = {name: member for name, member in vars(Backend).items() if inspect.isfunction(member) and not name.startswith("_")}
ATTRIBUTES = sorted(Backend.__annotations__)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda cls: cls.__name__)
def test_backend_keeps_the_contract(backend):
    for name, spec in METHODS.items():
        method = getattr(backend, name, None)
        assert callable(method), f"{backend.__name__} has no {name}()"
        assert inspect.iscoroutinefunction(method) == inspect.iscoroutinefunction(spec), \
            f"{backend.__name__}.{name} should {'' if inspect.iscoroutinefunction(spec) else 'not '}be async"
        assert list(inspect.signature(method).parameters) == list(inspect.signature(spec).parameters), \
            f"{backend.__name__}.{name}{inspect.signature(method)} should take {inspect.signature(spec)}"
    source = inspect.getsource(backend)
    for name in ATTRIBUTES:  # set in __init__ or start(), or a class attribute
        assert hasattr(backend, name) or f"self.{name} =" in source or f"self.{name}," in source, \
            f"{backend.__name__} never sets {name}"
