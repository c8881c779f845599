"""The engine in a process of its own (`integrations.engine_process`, what `multilora serve` runs):
the same routes through the real clients, answers equal to the offline engine on the same weights,
streams, aborts, runtime adapters, and what happens when the engine process dies."""

from __future__ import annotations

import copy
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import NotFoundError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

import multilora_plugin
from multilora_plugin import LLM, SamplingParams, UnavailableError, toy
from multilora_plugin.integrations.access import AccessPolicy
from multilora_plugin.integrations.engine_args import EngineArgs
from multilora_plugin.integrations.engine_process import EngineProcess
from multilora_plugin.integrations.local import running_server
from multilora_plugin.integrations.server import create_app

pytestmark = pytest.mark.slow  # engine processes, each importing torch afresh

PROMPTS = ["show me the number of students", "tell me a story about a little house", "the water at night"]
ADAPTERS = [None, "sql", "chat", "poem"]


class Kit:
    """Adapter files, an engine process serving three of them (two slots), and the offline oracle:
    `LLM` on the demo model in this process (the same weights in every process)."""

    def __init__(self, root):
        self.base = toy.demo_model()
        self.tokenizer = toy.demo_tokenizer()
        self.paths = toy.demo_adapters(self.base, root)
        offline = multilora_plugin.wrap(copy.deepcopy(self.base), max_loras=4)
        for name, path in self.paths.items():
            offline.register_adapter(name, path)
        self.llm = LLM(offline, self.tokenizer, load_entrypoints=False)
        self.args = EngineArgs(adapters={n: self.paths[n] for n in ("sql", "chat", "poem")}, max_loras=2,
                               max_num_seqs=16, cpu_threads=1)

    def offline(self, adapter, prompt: str, n: int) -> tuple:
        (out,) = self.llm.generate([prompt], SamplingParams(max_new_tokens=n, temperature=0), adapter,
                                   use_tqdm=False)
        return out.outputs[0].token_ids, out.outputs[0].text


def metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return Kit(tmp_path_factory.mktemp("engine-process"))


@pytest.fixture(scope="module")
def served(kit):
    backend = EngineProcess(kit.args, max_concurrent_requests=64)
    app = create_app(backend, served_model_name="tiny", access=AccessPolicy(allow_runtime_lora_updates=True))
    with running_server(app) as url:
        yield url
    assert not backend.process.is_alive()  # the app's shutdown stopped it


def test_real_clients_get_the_offline_answers(kit, served):
    tgi, openai = InferenceClient(base_url=served), OpenAI(base_url=served + "/v1", api_key="-", max_retries=0)
    for adapter, prompt in zip(ADAPTERS, PROMPTS * 2):
        ids, text = kit.offline(adapter, prompt, 8)
        events = list(tgi.text_generation(prompt, adapter_id=adapter, max_new_tokens=8, stream=True, details=True))
        assert [e.token.id for e in events] == ids, adapter
        out = tgi.text_generation(prompt, adapter_id=adapter, max_new_tokens=8, details=True)
        assert [t.id for t in out.details.tokens] == ids
        answer = openai.completions.create(model=adapter or "tiny", prompt=prompt, max_tokens=8, temperature=0)
        assert answer.choices[0].text == text
        chunks = openai.completions.create(model=adapter or "tiny", prompt=prompt, max_tokens=8, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in chunks) == text
    info = httpx.get(served + "/info").json()
    assert info["max_loras"] == 2 and sorted(info["adapters"]) == ["chat", "poem", "sql"]


def test_concurrent_streams_are_complete_and_counted(kit, served):
    before = metrics(served)
    jobs = [(ADAPTERS[i % 4], PROMPTS[i % 3], 3 + i % 6) for i in range(48)]

    def run(job):
        adapter, prompt, n = job
        client = InferenceClient(base_url=served)  # kept: the stream lives as long as its client
        events = client.text_generation(prompt, adapter_id=adapter, max_new_tokens=n, stream=True, details=True)
        return [e.token.id for e in events]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, jobs))
    for (adapter, prompt, n), ids in zip(jobs, got):
        assert ids == kit.offline(adapter, prompt, 8)[0][:n]
    after = metrics(served)
    ended = sum(v - before.get(k, 0) for k, v in after.items() if k[0] == "multilora_requests_total")
    assert ended == len(jobs) and after[("multilora_requests_in_flight", ())] == 0


def test_runtime_adapters_and_errors(kit, served):
    openai = OpenAI(base_url=served + "/v1", api_key="-", max_retries=0)
    with pytest.raises(NotFoundError):
        openai.completions.create(model="code", prompt=PROMPTS[0], max_tokens=4)
    r = httpx.post(served + "/v1/load_lora_adapter", json={"lora_name": "code", "lora_path": kit.paths["code"]})
    assert r.status_code == 200, r.text
    assert "code" in {m.id for m in openai.models.list()}
    answer = openai.completions.create(model="code", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert answer.choices[0].text == kit.offline("code", PROMPTS[0], 6)[1]
    # replaced in place: the next requests get the new files
    r = httpx.post(served + "/v1/load_lora_adapter", json={"lora_name": "code", "lora_path": kit.paths["sql"],
                                                           "load_inplace": True})
    assert r.status_code == 200, r.text
    answer = openai.completions.create(model="code", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert answer.choices[0].text == kit.offline("sql", PROMPTS[0], 6)[1]
    assert httpx.post(served + "/v1/unload_lora_adapter", json={"lora_name": "code"}).status_code == 200
    assert "code" not in {m.id for m in openai.models.list()}
    # errors cross the process boundary with their type, status and format
    r = httpx.post(served + "/generate", json={"inputs": "x", "parameters": {"adapter_id": "nope"}})
    assert r.status_code == 404 and r.json()["error_type"] == "validation"
    r = httpx.post(served + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent"})
    assert r.status_code == 400 and "/nonexistent" in r.json()["error"]["message"]
    r = httpx.post(served + "/v1/completions", json={"model": "tiny", "prompt": [[1, 10**6]]})
    assert r.status_code == 400


def test_an_adapter_whose_files_break_fails_only_its_requests(kit, served, tmp_path):
    broken = tmp_path / "broken"
    toy.make_adapter(kit.base, broken, r=4, seed=9)
    r = httpx.post(served + "/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(broken)})
    assert r.status_code == 200
    r = httpx.post(served + "/v1/unload_lora_adapter", json={"lora_name": "broken"})  # out of memory: re-read
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = httpx.post(served + "/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(broken)})
    assert r.status_code == 400
    ids, _ = kit.offline("sql", PROMPTS[1], 5)
    out = InferenceClient(base_url=served).text_generation(PROMPTS[1], adapter_id="sql", max_new_tokens=5,
                                                           details=True)
    assert [t.id for t in out.details.tokens] == ids


def test_a_client_that_leaves_aborts_its_request(served):
    def aborted() -> float:
        return metrics(served).get(("multilora_requests_total", (("adapter", "sql"), ("finish_reason", "abort"))), 0)

    start = aborted()
    body = {"model": "sql", "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served + "/v1/completions", json=body) as r:
        assert next(r.iter_lines()).startswith("data:")
    for _ in range(100):
        if aborted() == start + 1:
            break
        import time

        time.sleep(0.05)
    assert aborted() == start + 1
    assert metrics(served)[("multilora_requests_in_flight", ())] == 0


def test_when_the_engine_process_dies_requests_get_503(kit):
    """Without restarts (`max_deaths=1`); tests/test_engine_restart.py has the engine come back."""
    from multilora_plugin.integrations.restarts import RestartPolicy

    backend = EngineProcess(kit.args, restarts=RestartPolicy(max_deaths=1))
    with running_server(create_app(backend, served_model_name="tiny")) as url:
        body = {"inputs": PROMPTS[0], "parameters": {"adapter_id": "sql", "max_new_tokens": 400}}
        with httpx.stream("POST", url + "/generate_stream", json={**body}, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            os.kill(backend.process.pid, signal.SIGKILL)
            events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        assert "error" in events[-1] and "engine process" in events[-1]["error"]
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/generate", json=body)
        assert r.status_code == 503 and r.json()["error_type"] == "overloaded"


def test_a_bad_model_is_raised_by_the_constructor(tmp_path):
    (tmp_path / "empty").mkdir()  # a directory, so the engine process itself tries to load it
    with pytest.raises((OSError, ValueError, UnavailableError)):
        EngineProcess(EngineArgs(model=str(tmp_path / "empty")))
