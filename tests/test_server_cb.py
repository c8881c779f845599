"""The HTTP server over transformers' continuous batching (`integrations.cb_backend`, what
`multilora serve --engine transformers` runs): the real-client cases of test_server.py, unchanged,
against it (the same offline oracle: this package's own engine), then what only it has to say."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import BadRequestError, OpenAI
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import multilora_plugin
from multilora_plugin.integrations.access import AccessPolicy
from multilora_plugin.integrations.cb_backend import TransformersBackend
from multilora_plugin.integrations.local import running_server
from multilora_plugin.integrations.server import create_app

from .test_server import (  # noqa: F401 - collected here again, against the `served` below
    ADAPTERS,
    PROMPTS,
    Served,
    test_bad_requests_get_their_status_in_their_format,
    test_generate_routes_and_info,
    test_load_and_unload_while_serving,
    test_models_lists_base_and_adapters,
    test_openai_client_matches_offline,
    test_tgi_client_matches_offline,
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("cb-server-adapters"))
    model = multilora_plugin.wrap(copy.deepcopy(served.base), max_loras=2)
    for name in ("sql", "chat", "poem"):
        model.register_adapter(name, served.paths[name])
    served.backend = TransformersBackend(
        model, served.tokenizer, max_concurrent_requests=64,
        continuous_batching_config=ContinuousBatchingConfig(num_blocks=96, max_batch_tokens=64, page_size=16))
    app = create_app(served.backend, served_model_name="tiny", access=AccessPolicy(allow_runtime_lora_updates=True))
    served.app_server = app.state.server
    with running_server(app) as url:
        served.url = url
        yield served
    assert not served.backend.manager.is_running()


def test_concurrent_streams_over_transformers_cb(served):
    jobs = [(ADAPTERS[i % 4], PROMPTS[(i // 4) % 4], 3 + i % 6) for i in range(32)]

    def run(job):
        adapter, prompt, n = job
        client = InferenceClient(base_url=served.url)
        return [e.token.id for e in client.text_generation(prompt, adapter_id=adapter, max_new_tokens=n,
                                                            stream=True, details=True)]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, jobs))
    for (adapter, prompt, n), ids in zip(jobs, got):
        assert ids == served.offline(adapter, prompt, 10)[0][:n], (adapter, prompt, n)
    metrics = httpx.get(served.url + "/metrics").text
    assert "multilora_requests_in_flight 0.0" in metrics and "multilora_slots 2.0" in metrics
    assert served.backend.model.memory_stats().in_use == 0  # every hold released


def test_what_transformers_cb_cannot_serve_is_refused(served):
    client = OpenAI(base_url=served.url + "/v1", api_key="-", max_retries=0)
    with pytest.raises(BadRequestError, match="greedy decoding only"):
        client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=4, temperature=0.7)
    # lm-eval's local-completions scoring: refused, never answered without the prompt's log-probabilities
    with pytest.raises(BadRequestError, match=r"the prompt's log-probabilities \(echo with logprobs\)"):
        client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=1, temperature=0, echo=True, logprobs=1)
    r = httpx.post(served.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 3,
                                                                                 "top_n_tokens": 2, "details": True}})
    assert r.status_code == 400 and "greedy decoding only" in r.json()["error"]
    # a stop string is cut here, and the request is stopped in transformers
    ids, text, _ = served.offline("sql", PROMPTS[0], 8)
    stop = " " + text.split()[2]
    out = InferenceClient(base_url=served.url).text_generation(PROMPTS[0], adapter_id="sql", max_new_tokens=8,
                                                               stop=[stop], details=True)
    assert out.generated_text == text[:text.index(stop)] and out.details.finish_reason == "stop_sequence"
