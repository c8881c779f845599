"""Ray Serve: a local Ray cluster, two CPU replicas of a tiny model behind the HTTP ingress,
started and shut down by these tests.

Oracles: the offline `LLM.generate` of the same model directory and adapters (greedy), the
single-process server's own error answers, and, for routing, the same request sequence replayed
through random routing in simulation.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from multilora_plugin import LLM, LoRARequest, SamplingParams, toy  # noqa: E402
from multilora_plugin.integrations.local import free_port, running_server  # noqa: E402
from multilora_plugin.integrations.access import AccessPolicy  # noqa: E402
from multilora_plugin.integrations.engine_args import EngineArgs  # noqa: E402
from multilora_plugin.integrations.ray_serve import RayServeArgs, build_app  # noqa: E402
from multilora_plugin.integrations.server import create_app  # noqa: E402

pytestmark = pytest.mark.slow  # a local Ray cluster per module

VOCAB = 128
NAMES = [f"a{i:02d}" for i in range(12)]
PROMPTS = ["show me the number of students", "tell me a story about a little house", "the water at night"]
CPU_LORAS = 6  # per replica: the 12 adapters fit in the two replicas together, not in one


class Cluster:
    def __init__(self, root):
        self.base = toy.tiny_model("llama", vocab_size=VOCAB)
        self.model_dir = str(root / "model")
        self.base.save_pretrained(self.model_dir)
        toy.tiny_tokenizer(VOCAB).save_pretrained(self.model_dir)
        self.adapter_dir = root / "adapters"
        self.paths = toy.make_adapters(self.base, self.adapter_dir, NAMES, r=4)
        self.root = root
        self.args = dict(model=self.model_dir, adapter_dir=str(self.adapter_dir), max_loras=2,
                         max_cpu_loras=CPU_LORAS, max_num_seqs=16, served_model_name="tiny")
        self._llm = None
        self._cache = {}

    def offline(self, adapter, prompt: str, n: int):
        """(token ids, text) of greedy generation by the offline engine on the same files."""
        if self._llm is None:
            engine = EngineArgs(**self.args).build()
            self._llm = LLM(engine.model, engine.tokenizer, load_entrypoints=False)
        key = (adapter, prompt, n)
        if key not in self._cache:
            lora = None if adapter is None else LoRARequest(adapter, NAMES.index(adapter) + 1, self.paths[adapter])
            (out,) = self._llm.generate([prompt], SamplingParams(max_new_tokens=n, temperature=0), lora,
                                        use_tqdm=False)
            self._cache[key] = out.outputs[0].token_ids, out.outputs[0].text
        return self._cache[key]

    def metrics(self) -> dict:
        """{(name, labels minus Ray's own): value} summed over Ray's metrics endpoint."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        keep = ("adapter", "replica", "deployment", "finish_reason", "tier")
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in keep)))
                samples[key] = samples.get(key, 0) + s.value
        return samples


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("ray-serve"))
    cluster.metrics_port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=cluster.metrics_port,
             _system_config={"metrics_report_interval_ms": 500})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({**cluster.args, "replicas": 2, "allow_runtime_lora_updates": True}), name="multilora",
                  route_prefix="/")
        cluster.url = f"http://127.0.0.1:{port}"
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()


def _complete(url: str, model: str, prompt: str, n: int = 6) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


# outputs ------------------------------------------------------------------------------------------------
def test_outputs_through_ray_equal_offline(cluster):
    """OpenAI (plain and streamed) and TGI (streamed with details) answers, for adapters on both
    replicas and for the base model, equal the offline engine's, token for token."""
    client = OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)
    tgi = InferenceClient(base_url=cluster.url)
    replicas = set()
    for i, adapter in enumerate([None, "a00", "a01", "a02", "a03"]):
        prompt = PROMPTS[i % len(PROMPTS)]
        ids, text = cluster.offline(adapter, prompt, 8)
        raw = client.completions.with_raw_response.create(model=adapter or "tiny", prompt=prompt, max_tokens=8,
                                                          temperature=0)
        replicas.add(raw.headers["x-multilora-replica"])
        assert raw.parse().choices[0].text == text
        stream = client.completions.create(model=adapter or "tiny", prompt=prompt, max_tokens=8, temperature=0,
                                           stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream) == text
        events = list(tgi.text_generation(prompt, adapter_id=adapter, max_new_tokens=8, stream=True, details=True))
        assert [e.token.id for e in events] == ids
        assert events[-1].generated_text == text
    assert len(replicas) == 2  # both replicas answered


def test_models_and_info_come_from_the_catalog(cluster):
    models = httpx.get(cluster.url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny"] + NAMES
    info = httpx.get(cluster.url + "/info").json()
    assert (info["max_loras"], info["model_type"], info["max_total_tokens"]) == (2, "llama", 512)
    assert httpx.get(cluster.url + "/health").status_code == 200


# routing ------------------------------------------------------------------------------------------------
def _random_routing_rate(sequence) -> float:
    """The resident rate if each request went to a replica chosen at random (simulated by the
    benchmark's function: each replica keeps its CPU_LORAS most recently used adapters)."""
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_ray.py"
    spec = importlib.util.spec_from_file_location("bench_ray", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.random_routing_rate(sequence, replicas=2, capacity=CPU_LORAS)


def test_requests_follow_their_adapter(cluster):
    """12 adapters over two replicas that each hold six: repeated requests for an adapter land on
    a replica that already has it in memory far more often than random routing would."""
    rng = random.Random(1)
    sequence = [rng.choice(NAMES) for _ in range(240)]
    resident, seen = [], set()

    def send(name):
        response = _complete(cluster.url, name, PROMPTS[0], n=4)
        assert response.status_code == 200, response.text
        return response.headers

    with ThreadPoolExecutor(4) as pool:
        for start in range(0, len(sequence), 4):  # four at a time, as a light steady load
            chunk = sequence[start:start + 4]
            for name, headers in zip(chunk, pool.map(send, chunk)):
                if name in seen:
                    resident.append(headers["x-multilora-adapter-resident"] == "true")
                seen.add(name)
    rate = sum(resident) / len(resident)
    expected = _random_routing_rate(sequence)
    print(f"resident rate {rate:.2f} (random routing: {expected:.2f}) over {len(resident)} repeated requests")
    assert expected < 0.7
    assert rate >= 0.75 and rate >= expected + 0.2


def test_replica_metrics_and_cache_bounds(cluster):
    """Each replica records the engine's series in Ray's metrics, tagged with the replica, next
    to Serve's own; every replica's caches stayed within their bounds."""
    before = sum(v for (name, labels), v in cluster.metrics().items() if name == "ray_multilora_requests_total")
    for name in NAMES[:4]:
        assert _complete(cluster.url, name, PROMPTS[1], n=3).status_code == 200
    deadline = time.monotonic() + 30
    while True:
        samples = cluster.metrics()
        finished = sum(v for (name, labels), v in samples.items() if name == "ray_multilora_requests_total")
        if finished >= before + 4 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert finished >= before + 4
    replicas = {dict(labels)["replica"] for (name, labels) in samples if name == "ray_multilora_requests_total"}
    assert len(replicas) == 2
    by_replica = lambda metric: {dict(labels)["replica"]: v for (name, labels), v in samples.items()  # noqa: E731
                                 if name == metric}
    cpu, bound = by_replica("ray_multilora_cpu_adapters"), by_replica("ray_multilora_max_cpu_loras")
    in_use, slots = by_replica("ray_multilora_slots_in_use"), by_replica("ray_multilora_slots")
    assert set(cpu) == set(bound) == replicas
    assert all(cpu[r] <= bound[r] == CPU_LORAS and in_use[r] <= slots[r] == 2 for r in replicas)
    served_models = by_replica("ray_serve_num_multiplexed_models")
    assert served_models and all(v <= CPU_LORAS for v in served_models.values())
    assert any(name.startswith("ray_serve_") for name, _ in samples)
    assert any(name == "ray_multilora_time_to_first_token_seconds_count" for name, _ in samples)
    assert httpx.get(cluster.url + "/metrics").status_code == 404  # pointed at Ray's endpoint


def test_a_client_that_leaves_aborts_its_request_on_the_replica(cluster):
    """Closing a stream after two events cancels the replica's generator, which aborts the engine
    request (counted with finish_reason "abort" in the replica's metrics), and the ingress holds
    nothing afterwards."""
    def aborted() -> float:
        return sum(v for (name, labels), v in cluster.metrics().items()
                   if name == "ray_multilora_requests_total" and dict(labels).get("finish_reason") == "abort")

    before = aborted()
    body = {"model": "a04", "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ") and next(lines) == "" and next(lines).startswith("data: ")
    deadline = time.monotonic() + 30
    while aborted() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert aborted() == before + 1


# errors -------------------------------------------------------------------------------------------------
def _broken_adapter(cluster, name: str) -> str:
    """A real adapter directory whose weights file is not a safetensors file."""
    path = cluster.adapter_dir / name
    toy.make_adapter(cluster.base, path, r=4)
    (path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    return str(path)


def _without_ids(text: str) -> str:
    return re.sub(r"(cmpl|tgi)-[0-9a-f]{32}", "ID", text)


def test_adapter_errors_match_the_single_process_server(cluster):
    """An adapter whose weights cannot be read, one that is not known, and a bad request get the
    status and body the single-process server gives for the same files."""
    late = _broken_adapter(cluster, "late")  # appears in adapter_dir after start: found on first use
    engine = EngineArgs(**cluster.args).build()
    bodies = [
        ("/v1/completions", {"model": "late", "prompt": "the water", "max_tokens": 3}),
        ("/generate", {"inputs": "the water", "parameters": {"adapter_id": "late", "max_new_tokens": 3}}),
        ("/v1/completions", {"model": "missing", "prompt": "the water", "max_tokens": 3}),
        ("/generate", {"inputs": "the water", "parameters": {"adapter_id": "missing"}}),
        ("/v1/completions", {"model": "a00", "prompt": [VOCAB + 5], "max_tokens": 3}),
        ("/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": late}),
        ("/v1/load_lora_adapter", {"lora_name": "a01", "lora_path": cluster.paths["a01"]}),
        ("/v1/unload_lora_adapter", {"lora_name": "missing"}),
    ]
    with running_server(create_app(engine, served_model_name="tiny",
                                   access=AccessPolicy(allow_runtime_lora_updates=True))) as local:
        for route, body in bodies:
            want = httpx.post(local + route, json=body, timeout=60)
            got = httpx.post(cluster.url + route, json=body, timeout=60)
            assert want.status_code in (400, 404)
            assert (got.status_code, _without_ids(got.text)) == (want.status_code, _without_ids(want.text)), route
    engine.close()
    # the other adapters are unaffected
    assert _complete(cluster.url, "a00", PROMPTS[0], n=4).json()["choices"][0]["text"] == \
        cluster.offline("a00", PROMPTS[0], 4)[1]


def test_load_and_unload_at_run_time(cluster):
    path = toy.make_adapter(cluster.base, cluster.root / "extra" / "fresh", r=4, seed=9)
    response = httpx.post(cluster.url + "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": path})
    assert response.status_code == 200, response.text
    engine = EngineArgs(**cluster.args).build()
    engine.model.register_adapter("fresh", path)
    want = LLM(engine.model, engine.tokenizer, load_entrypoints=False).generate(
        [PROMPTS[2]], SamplingParams(max_new_tokens=5, temperature=0), LoRARequest("fresh", 1), use_tqdm=False)
    assert _complete(cluster.url, "fresh", PROMPTS[2], n=5).json()["choices"][0]["text"] == want[0].outputs[0].text
    assert httpx.post(cluster.url + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
    assert _complete(cluster.url, "fresh", PROMPTS[2]).status_code == 404


# a replica dies -----------------------------------------------------------------------------------------
def _kill_replica(replica: str) -> None:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].endswith(replica) and "LoRAReplica" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError(f"no actor for replica {replica}")


def test_a_killed_replica_fails_its_requests_clearly_and_is_replaced(cluster):
    """Streams in flight on a replica that is killed end with an error event (503, "stopped"), not
    a hang; Serve starts a new replica and later requests succeed on both."""
    adapter = "a05"
    assert _complete(cluster.url, adapter, PROMPTS[0]).status_code == 200  # the adapter has a home

    def stream(_):
        body = {"model": adapter, "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "stream": True}
        events, replica = [], None
        with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=60) as response:
            replica = response.headers["x-multilora-replica"]
            started.append(replica)
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        return replica, events

    started = []
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream, i) for i in range(6)]
        deadline = time.monotonic() + 30
        while len(started) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        victim = max(set(started), key=started.count)
        _kill_replica(victim)
        results = [f.result(timeout=90) for f in futures]
    failed = 0
    for replica, events in results:
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        if "error" in last:
            failed += 1
            assert replica == victim
            assert last["error"]["code"] == 503 and "stopped" in last["error"]["message"]
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    assert failed >= 1
    # later requests succeed, first on the survivor, then on the replacement as well
    deadline = time.monotonic() + 120
    replicas_seen = set()
    while time.monotonic() < deadline and len(replicas_seen) < 2:
        for name in NAMES:
            response = _complete(cluster.url, name, PROMPTS[1], n=2)
            if response.status_code == 200:
                replicas_seen.add(response.headers["x-multilora-replica"])
            else:
                assert response.status_code == 503 and "stopped" in response.json()["error"]["message"]
        time.sleep(0.5)
    assert len(replicas_seen) == 2 and victim not in replicas_seen


# arguments ----------------------------------------------------------------------------------------------
def test_serve_run_arguments_are_validated():
    """`serve run ...:build_app key=value` passes strings; they are checked like the CLI's."""
    args = RayServeArgs.model_validate({"model": "m", "replicas": "3", "adapters": "sql=/a,chat=/b"})
    assert args.replicas == 3 and args.engine_args().adapters == {"sql": "/a", "chat": "/b"}
    for bad in ({"replicas": "0"}, {"adapters": "sql"}, {"max_lorax": 2}):
        with pytest.raises(ValueError):
            RayServeArgs.model_validate(bad)
    # what `serve run` does with the builder and its key=value arguments
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    app = call_user_app_builder_with_args_if_necessary(build_app, {"replicas": "2", "max_loras": "3"})
    assert isinstance(app, serve.Application)


def test_cli_serve_ray_starts_the_application(monkeypatch, tmp_path):
    """`multilora serve --ray --replicas 2 ...` builds the application from its options and runs it
    on the cluster (the cluster calls are recorded here; the tests above run a real one)."""
    from multilora_plugin import cli
    from multilora_plugin.integrations import ray_serve

    calls = {}
    monkeypatch.setattr(ray, "init", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.setdefault("ray_shutdown", True))
    monkeypatch.setattr(serve, "start", lambda **kw: calls.setdefault("start", kw))
    monkeypatch.setattr(serve, "run", lambda app, **kw: calls.setdefault("run", kw))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.setdefault("serve_shutdown", True))
    monkeypatch.setattr(ray_serve, "build_app", lambda args: calls.setdefault("args", args))

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", interrupt)
    assert cli.main(["serve", "--ray", "--replicas", "2", "--ray-address", "auto", "--adapter", "x=/adapters/x",
                     "--max-loras", "3", "--port", "8123"]) == 0
    assert calls["init"]["address"] == "auto"
    assert calls["start"] == {"http_options": {"host": "127.0.0.1", "port": 8123}}
    assert calls["run"] == {"name": "multilora", "route_prefix": "/"}
    args = RayServeArgs.model_validate(calls["args"])
    assert (args.replicas, args.max_loras, args.model) == (2, 3, None)
    assert args.adapters["x"] == "/adapters/x" and set(toy.DEMO_ADAPTERS) <= set(args.adapters)
    assert calls["serve_shutdown"] and calls["ray_shutdown"]
