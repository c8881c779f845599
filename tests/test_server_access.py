"""What clients of the HTTP server may do (integrations/access.py): hostile text, runtime adapter
updates behind the operator's switch, adapter roots, adapter names, hot replace with `load_inplace`
(PEFT on the new files is the oracle), the API key and size limits. Every refusal is a 4xx in the
API's own format."""

from __future__ import annotations

import copy
import os

import httpx
import pytest
import torch
from openai import AuthenticationError, OpenAI

import multilora_plugin
from multilora_plugin import Engine, toy
from multilora_plugin.cli import running_server
from multilora_plugin.integrations.access import AccessPolicy
from multilora_plugin.integrations.server import create_app

PROMPT = "the water at night"


class Kit:
    def __init__(self, root):
        self.root = root
        self.base = toy.tiny_model("llama", vocab_size=128)
        self.tokenizer = toy.tiny_tokenizer(128)
        self.adapters = root / "adapters"
        self.paths = {name: toy.make_adapter(self.base, self.adapters / name, r=4, seed=seed)
                      for name, seed in (("A", 1), ("B", 2), ("C", 3))}

    def app(self, **access):
        model = multilora_plugin.wrap(copy.deepcopy(self.base), max_loras=2)
        model.load_adapter("A", self.paths["A"])  # the operator's
        self.engine = Engine(model, self.tokenizer, load_entrypoints=False)
        return create_app(self.engine, served_model_name="tiny", access=AccessPolicy(**access))

    def peft_ids(self, name: str, n: int) -> list:
        from peft import PeftModel

        model = PeftModel.from_pretrained(copy.deepcopy(self.base), self.paths[name]).eval()
        ids = self.tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False)
        return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return Kit(tmp_path_factory.mktemp("access"))


def tgi_ids(url: str, adapter, n: int = 6, **kw) -> list:
    body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter, "max_new_tokens": n, "details": True}}
    r = httpx.post(url + "/generate", json=body, timeout=30, **kw)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def assert_error(r: httpx.Response, path: str, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    if path.startswith("/v1/"):
        assert body["error"]["message"] and body["error"]["type"]
    else:
        assert isinstance(body["error"], str) and body["error_type"] == "validation"
    return body


SURROGATE_BODIES = [
    ("/generate", '{"inputs": "\\ud800 x"}'),
    ("/generate_stream", '{"inputs": "x \\udfff"}'),
    ("/", '{"inputs": "\\ud800", "stream": true}'),
    ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800 x"}'),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\ud800"]}'),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}'),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/chat/completions", '{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}'),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "\\ud800": 1}'),
]


def test_hostile_text_gets_a_4xx_and_the_server_goes_on(kit):
    with running_server(kit.app()) as url:
        for path, raw in SURROGATE_BODIES:
            r = httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)
            assert_error(r, path, 422)
        assert_error(httpx.get(url + "/generate"), "/generate", 405)  # wrong method: TGI's format
        assert_error(httpx.get(url + "/v1/nothing"), "/v1/nothing", 404)
        assert tgi_ids(url, "A") == kit.peft_ids("A", 6)
    kit.engine.close()


def test_runtime_adapter_updates_are_off_by_default(kit):
    with running_server(kit.app()) as url:
        for path, body in (("/v1/load_lora_adapter", {"lora_name": "B", "lora_path": kit.paths["B"]}),
                           ("/v1/unload_lora_adapter", {"lora_name": "A"})):
            assert "--allow-runtime-lora-updates" in assert_error(httpx.post(url + path, json=body), path, 403)[
                "error"]["message"]
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["tiny", "A"]
    kit.engine.close()


def test_adapter_roots_names_and_the_operators_adapters(kit, tmp_path):
    outside = tmp_path / "outside"
    toy.make_adapter(kit.base, outside, r=4, seed=5)
    (kit.adapters / "escape").unlink(missing_ok=True)
    os.symlink(outside, kit.adapters / "escape")
    load = "/v1/load_lora_adapter"
    with running_server(kit.app(allow_runtime_lora_updates=True, adapter_roots=(kit.adapters,))) as url:
        # outside every root: refused before anything is read, the same answer whether it exists or not
        answers = set()
        for path in (str(outside), str(tmp_path / "missing"), "../" + outside.name, "escape", "/etc"):
            body = assert_error(httpx.post(url + load, json={"lora_name": "x", "lora_path": path}), load, 403)
            answers.add(body["error"]["message"].split("`lora_path` ")[1].split(" is not inside")[1])
        assert len(answers) == 1
        for name in ("tiny", "a/b", "a\\b", "x\n", "x" * 129, ""):
            assert_error(httpx.post(url + load, json={"lora_name": name, "lora_path": "B"}), load, 400)
        # a relative path is taken against the root, not the server's working directory
        assert httpx.post(url + load, json={"lora_name": "B", "lora_path": "B"}).status_code == 200
        assert tgi_ids(url, "B") == kit.peft_ids("B", 6)
        # the operator's adapter is not the clients' to unload or replace
        assert_error(httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "A"}), "/v1/unload", 403)
        r = httpx.post(url + load, json={"lora_name": "A", "lora_path": "C", "load_inplace": True})
        assert_error(r, load, 403)
        assert tgi_ids(url, "A") == kit.peft_ids("A", 6)
        # an existing name without load_inplace: the hint names the HTTP field
        r = httpx.post(url + load, json={"lora_name": "B", "lora_path": "C"})
        assert "load_inplace" in assert_error(r, load, 400)["error"]["message"]
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "B"}).status_code == 200
    kit.engine.close()


def test_load_inplace_replaces_a_runtime_adapter(kit):
    """An RL loop publishes a new version under the same name: the next requests get PEFT's output on
    the new files; a stream that was running finishes on the old version."""
    load = "/v1/load_lora_adapter"
    with running_server(kit.app(allow_runtime_lora_updates=True)) as url:
        assert httpx.post(url + load, json={"lora_name": "run", "lora_path": kit.paths["B"]}).status_code == 200
        assert tgi_ids(url, "run") == kit.peft_ids("B", 6)
        with httpx.stream("POST", url + "/generate_stream", timeout=60, json={
                "inputs": PROMPT, "parameters": {"adapter_id": "run", "max_new_tokens": 24}}) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            r = httpx.post(url + load, json={"lora_name": "run", "lora_path": kit.paths["C"], "load_inplace": True})
            assert r.status_code == 200 and "replaced" in r.text, r.text
            events = [first] + [line for line in lines if line.startswith("data:")]
        import json

        streamed = [json.loads(e[5:])["token"]["id"] for e in events]
        assert streamed == kit.peft_ids("B", 24)  # the running request kept the old version
        assert tgi_ids(url, "run") == kit.peft_ids("C", 6)  # new requests get the new one
    kit.engine.close()


def test_api_key_guards_every_route_but_health_and_metrics(kit):
    with running_server(kit.app(api_key="s3cret")) as url:
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200
        assert_error(httpx.get(url + "/v1/models"), "/v1/models", 401)
        assert_error(httpx.post(url + "/generate", json={"inputs": "x"}), "/generate", 401)
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
        assert [m.id for m in OpenAI(base_url=url + "/v1", api_key="s3cret").models.list()] == ["tiny", "A"]
        assert tgi_ids(url, "A", headers={"Authorization": "Bearer s3cret"}) == kit.peft_ids("A", 6)
    kit.engine.close()


def test_size_limits_are_checked_before_tokenizing(kit):
    with running_server(kit.app(max_request_chars=1000)) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "w " * 600})
        assert "max_request_chars" in assert_error(r, "/v1/completions", 413)["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": "w " * 600}]})
        assert_error(r, "/v1/chat/completions", 413)
        r = httpx.post(url + "/generate", content=b'{"inputs": "' + b"x" * 80_000 + b'"}',
                       headers={"content-type": "application/json"})
        assert_error(r, "/generate", 413)  # the body alone is over the limit: refused before it is parsed
        assert httpx.get(url + "/health").status_code == 200
        assert tgi_ids(url, "A") == kit.peft_ids("A", 6)
    kit.engine.close()


def test_large_prompts_do_not_stall_the_event_loop(kit):
    """Eight concurrent prompts near the size limit are tokenized off the event loop: /health answers
    meanwhile (its slowest latency is printed), each big request gets its 4xx, and serving goes on."""
    import concurrent.futures
    import time

    big = "water " * 150_000  # 900,000 characters: under the limit, far over the model's positions
    with running_server(kit.app()) as url:
        def send(_):
            return httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": big, "max_tokens": 1},
                              timeout=120).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, i) for i in range(8)]
            probes = []
            while not all(f.done() for f in futures):
                start = time.perf_counter()
                assert httpx.get(url + "/health", timeout=30).status_code == 200
                probes.append(time.perf_counter() - start)
                time.sleep(0.05)
            statuses = [f.result() for f in futures]
        print(f"/health during 8 large prompts: {len(probes)} probes, slowest {max(probes or [0]) * 1e3:.0f} ms")
        assert statuses == [400] * 8  # too long for the model's positions, said after tokenizing
        assert max(probes or [0]) < 2.0
        assert tgi_ids(url, "A") == kit.peft_ids("A", 6)
    kit.engine.close()
