"""Property-based requests against the server's own OpenAPI schema (schemathesis): whatever a
client sends, the answer is never a server error (5xx)."""

from __future__ import annotations

import copy

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

import multilora_plugin
from multilora_plugin import toy
from multilora_plugin.integrations.local import running_server
from multilora_plugin.integrations.server import create_app

pytestmark = pytest.mark.slow  # schemathesis generates and sends hundreds of bodies


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    base = toy.tiny_model("llama", vocab_size=128)
    root = tmp_path_factory.mktemp("schema-adapters")
    model = multilora_plugin.wrap(copy.deepcopy(base), max_loras=2)
    for name, seed in (("sql", 1), ("chat", 2)):
        model.register_adapter(name, toy.make_adapter(base, root / name, r=4, seed=seed))
    # short outputs keep the run fast: max_model_len bounds prompt + output tokens
    engine = multilora_plugin.Engine(model, toy.tiny_tokenizer(128), load_entrypoints=False, max_model_len=64)
    with running_server(create_app(engine, served_model_name="tiny")) as url:
        yield schemathesis.openapi.from_url(url + "/openapi.json")
    engine.close()


def _operations():
    """Every route of the app, as test ids (`test_every_route_is_fuzzed` checks the list)."""
    return ["GET /health", "GET /info", "GET /metrics", "GET /v1/models", "POST /", "POST /generate",
            "POST /generate_stream", "POST /v1/completions", "POST /v1/chat/completions",
            "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter"]


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
@pytest.mark.parametrize("route", _operations())
def test_no_request_makes_a_server_error(api_schema, route, mode):
    """Positive cases match the schema (they may still be refused: 4xx); negative ones break it."""
    method, path = route.split()
    if mode is GenerationMode.NEGATIVE and method == "GET":
        pytest.skip("a GET route without parameters has no invalid request to send")
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(checks=[not_a_server_error], timeout=60)

    check()


def test_every_route_is_fuzzed(api_schema):
    routes = {f"{op.ok().method.upper()} {op.ok().path}" for op in api_schema.get_all_operations()}
    assert routes == set(_operations())
