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
from multilora_plugin.integrations.local import running_server
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


def while_probing(url: str, send, items, what: str) -> tuple:
    """`send(item)` for every item, eight at a time, while /health is asked over and over; returns
    (the answers, the slowest /health in seconds), and prints the probe latency."""
    import concurrent.futures
    import time

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(send, item) for item in items]
        probes = []
        while not all(f.done() for f in futures):
            start = time.perf_counter()
            assert httpx.get(url + "/health", timeout=30).status_code == 200
            probes.append(time.perf_counter() - start)
            time.sleep(0.02)
    slowest = max(probes or [0.0])
    print(f"/health during {what}: {len(probes)} probes, slowest {slowest * 1e3:.0f} ms")
    return [f.result() for f in futures], slowest


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
    big = "water " * 150_000  # 900,000 characters: under the limit, far over the model's positions
    with running_server(kit.app()) as url:
        def send(_):
            return httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": big, "max_tokens": 1},
                              timeout=120).status_code

        statuses, slowest = while_probing(url, send, range(8), "8 large prompts")
        assert statuses == [400] * 8  # too long for the model's positions, said after tokenizing
        assert slowest < 2.0
        assert tgi_ids(url, "A") == kit.peft_ids("A", 6)
    kit.engine.close()


HOSTILE = [  # (path, raw body, status): what no client may turn into a 5xx (a few are fine: 200)
    *[(path, raw, 422) for path, raw in SURROGATE_BODIES],
    ("/generate", '{"inputs": "x", "parameters": {"max_new_tokens": 1e309}}', 422),  # inf
    ("/generate", '{"inputs": "x", "parameters": {"max_new_tokens": 1' + "0" * 400 + '}}', 400),  # > positions
    ("/generate", '{"inputs": "x", "parameters": {"temperature": NaN, "do_sample": true}}', 422),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "seed": -1}', 400),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "seed": ' + "9" * 40 + '}', 400),
    ("/v1/completions", '{"model": "tiny", "prompt": [[' + ",".join(["1"] * 3000) + ']]}', 400),  # too long
    ("/v1/completions", '{"model": "tiny", "prompt": [[-1]]}', 400),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "max_tokens": 1e20}', 422),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "stop": ' + '["a"' + ',"a"' * 100 + ']}', 400),
    ("/v1/completions", '{"model": {"$gt": ""}, "prompt": "x"}', 422),
    ("/v1/completions", '[' * 50_000 + ']' * 50_000, 400),  # nesting deeper than any parser's recursion
    ("/v1/completions", '{"model": "tiny", "prompt": "x"' + ', "a": 1' * 20_000 + '}', 200),  # unknown: ignored
    ("/v1/completions", b'\xff\xfe{"model": "tiny"}', 400),  # not UTF-8
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "system", "content": "x"}]}', 200),
    # a role of the host's own is the chat template's to render, as in vLLM
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "root", "content": "x"}]}', 200),
    ("/v1/chat/completions", '{"model": "../../etc/passwd", "messages": [{"role": "user", "content": "x"}]}', 404),
    ("/generate", '{"inputs": "x", "parameters": {"adapter_id": "/etc"}}', 404),
    ("/generate", '{"inputs": "x", "parameters": {"adapter_id": "../A"}}', 404),
    ("/v1/load_lora_adapter", '{"lora_name": "x", "lora_path": "/etc"}', 403),
    ("/v1/unload_lora_adapter", '{"lora_name": "A"}', 403),
    ("/generate", "x" * 7_000_000, 413),
]


def test_hostile_table_gets_only_4xx_while_the_server_stays_responsive(kit):
    """Every hostile body at once, eight at a time, while /health is probed: each gets its status (the
    refusals in their API's format, never a 5xx), the probe's slowest answer is printed, and serving
    goes on after."""
    with running_server(kit.app()) as url:
        def send(case):
            path, raw, _ = case
            content = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
            return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=120)

        answers, slowest = while_probing(url, send, HOSTILE, f"{len(HOSTILE)} hostile requests")
        wrong = [(case[0], case[1][:60], r.status_code, r.text[:200]) for case, r in zip(HOSTILE, answers)
                 if r.status_code != case[2]]
        assert not wrong, wrong
        for case, r in zip(HOSTILE, answers):
            if r.status_code != 200:
                assert_error(r, case[0], case[2])
        assert slowest < 2.0
        assert tgi_ids(url, "A") == kit.peft_ids("A", 6)
    kit.engine.close()
