"""A slot never serves weights other than the ones asked for, on every path that changes what an
adapter name holds: unload + load under the same name, evict after its files changed on disk, hot
replace, weights from a plugin, and registering a name again while a batch still holds the old one.

Each path is checked through `model(...)`, `generate`, the engine and the HTTP routes, against PEFT
on the files that the request should be served from.
"""

from __future__ import annotations

import copy
import shutil

import httpx
import pytest
import torch
from peft import PeftModel
from peft.utils import load_peft_weights

import multilora_plugin
from multilora_plugin import AdapterState, Engine, SamplingParams, hookimpl, toy
from multilora_plugin.integrations.local import running_server
from multilora_plugin.integrations.access import AccessPolicy
from multilora_plugin.integrations.server import create_app

VOCAB = 128
EOS = 3  # the tiny tokenizer's </s>
PROMPT = [5, 17, 42, 9, 77, 23]
# three adapters of the same shape (same rank and targets), so a stale slot would not show up as an error
SPECS = {"A": 1, "B": 2, "C": 3}


class Kit:
    """A tiny Llama, three same-shaped adapters on disk, and PEFT's answers for each of them."""

    def __init__(self, root):
        self.root = root
        self.base = toy.tiny_model("llama", vocab_size=VOCAB)
        self.tokenizer = toy.tiny_tokenizer(VOCAB)
        self.paths = {name: toy.make_adapter(self.base, root / name, r=4, lora_alpha=8, seed=seed)
                      for name, seed in SPECS.items()}
        self._peft = {}

    def copy(self, name: str, to: str) -> str:
        """A copy of adapter `name` in a directory of its own (to be rewritten by the test)."""
        target = self.root / to
        shutil.copytree(self.paths[name], target, dirs_exist_ok=True)
        return str(target)

    def rewrite(self, path: str, name: str) -> None:
        """Overwrite the files in `path` with those of adapter `name`, as a training job publishes."""
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(f"{self.paths[name]}/{file}", f"{path}/{file}")

    def wrapped(self, max_loras: int = 2):
        return multilora_plugin.wrap(copy.deepcopy(self.base), max_loras=max_loras)

    def peft(self, name: str):
        if name not in self._peft:
            self._peft[name] = PeftModel.from_pretrained(copy.deepcopy(self.base), self.paths[name]).eval()
        return self._peft[name]

    def logits(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.peft(name)(ids).logits

    def tokens(self, name: str, prompt=PROMPT, n: int = 8) -> list:
        """PEFT's greedy tokens for `prompt` alone, cut after the first EOS."""
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = self.peft(name).generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=n, pad_token_id=0, eos_token_id=None)
        tokens = out[0, len(prompt):].tolist()
        return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    kit = Kit(tmp_path_factory.mktemp("content"))
    ids = torch.tensor([PROMPT])
    for a in SPECS:  # guard against a vacuous test: the adapters really differ
        for b in SPECS:
            if a < b:
                assert not torch.allclose(kit.logits(a, ids), kit.logits(b, ids), atol=1e-3)
                assert kit.tokens(a) != kit.tokens(b)
    return kit


IDS = torch.tensor([PROMPT, PROMPT[::-1]])


def forward(model, names):
    with torch.no_grad():
        return model(IDS, adapter_names=names).logits


def assert_serves(model, names, want: dict, kit):
    """Each row of a forward with `names` equals PEFT with the adapter `want[name]` names."""
    got = forward(model, names)
    for row, name in enumerate(names):
        expected = kit.logits(want[name], IDS)[row] if name is not None else None
        if expected is not None:
            torch.testing.assert_close(got[row], expected, atol=1e-4, rtol=0, msg=f"row {row}: {name}")


# model(...) -----------------------------------------------------------------------------------------------
def test_unload_and_load_under_the_same_name_in_the_same_slot(kit):
    model = kit.wrapped(max_loras=2)
    model.load_adapter("x", kit.paths["A"])
    assert_serves(model, ["x", None], {"x": "A"}, kit)
    first = model.adapter_cache.contents().index("x")
    model.unload_adapter("x")
    model.load_adapter("x", kit.paths["B"])
    assert_serves(model, ["x", None], {"x": "B"}, kit)
    assert model.adapter_cache.contents().index("x") == first  # the same slot, rewritten


def test_unload_and_load_under_the_same_name_in_another_slot(kit):
    model = kit.wrapped(max_loras=2)
    model.load_adapter("x", kit.paths["A"])
    model.load_adapter("y", kit.paths["C"])
    assert_serves(model, ["x", "y"], {"x": "A", "y": "C"}, kit)
    model.unload_adapter("x")
    model.load_adapter("x", kit.paths["B"])
    assert_serves(model, ["y", "y"], {"y": "C"}, kit)
    assert_serves(model, ["y", "x"], {"x": "B", "y": "C"}, kit)


def test_evict_after_the_files_changed_reads_the_new_files(kit):
    model = kit.wrapped(max_loras=2)
    path = kit.copy("A", "evicted")
    model.register_adapter("x", path)
    assert_serves(model, ["x", None], {"x": "A"}, kit)
    before = model.adapters["x"].content_id
    kit.rewrite(path, "B")
    assert_serves(model, ["x", None], {"x": "A"}, kit)  # what is in memory stays until it is read again
    assert model.evict_adapter("x") and model.adapter_state("x") is AdapterState.COLD
    assert_serves(model, ["x", None], {"x": "B"}, kit)
    assert model.adapters["x"].content_id != before
    kit.rewrite(path, "A")


def test_evict_of_unchanged_files_keeps_the_content_id(kit):
    model = kit.wrapped(max_loras=2)
    model.register_adapter("x", kit.paths["A"])
    assert_serves(model, ["x", None], {"x": "A"}, kit)
    before = model.adapters["x"].content_id
    assert model.evict_adapter("x")
    assert model.adapters["x"].content_id is None
    assert_serves(model, ["x", None], {"x": "A"}, kit)
    assert model.adapters["x"].content_id == before


def test_replace_serves_the_new_weights_in_the_same_slot(kit):
    model = kit.wrapped(max_loras=1)
    model.load_adapter("x", kit.paths["A"])
    assert_serves(model, ["x", "x"], {"x": "A"}, kit)
    info = model.load_adapter("x", kit.paths["B"], replace=True)
    assert info.version == 2
    assert_serves(model, ["x", None], {"x": "B"}, kit)


class Store:
    """A weights plugin: serves whatever PEFT state dict it holds for an adapter name."""

    def __init__(self) -> None:
        self.tensors: dict = {}

    @hookimpl
    def multilora_load_adapter_weights(self, source):
        return self.tensors.get(source.name)


def test_plugin_weights_that_change_are_served_after_an_evict(kit):
    model = kit.wrapped(max_loras=2)
    store = Store()
    engine = Engine(model, kit.tokenizer, plugins=[store], load_entrypoints=False)
    store.tensors["x"] = load_peft_weights(kit.paths["A"])
    model.register_adapter("x", kit.paths["C"])  # the config is read from here, the weights from the store
    assert_serves(model, ["x", None], {"x": "A"}, kit)
    store.tensors["x"] = load_peft_weights(kit.paths["B"])
    before = model.adapters["x"].content_id
    assert model.evict_adapter("x")
    assert_serves(model, ["x", None], {"x": "B"}, kit)
    assert model.adapters["x"].content_id != before  # weights from a plugin: every read is a new content
    engine.close()


def test_register_again_while_a_batch_holds_the_unloaded_version(kit):
    """A forward hook unloads "x" and registers it again from other files in the middle of a
    forward: that forward computes the old weights everywhere, the next one the new weights."""
    model = kit.wrapped(max_loras=2)
    model.load_adapter("x", kit.paths["A"])
    done = []

    def republish(module, args, output):
        if not done:
            model.unload_adapter("x")
            done.append(model.load_adapter("x", kit.paths["B"]))

    handle = model.hf_model.model.layers[0].register_forward_hook(republish)
    assert_serves(model, ["x", "x"], {"x": "A"}, kit)
    handle.remove()
    assert done and model.adapters["x"].path == kit.paths["B"]
    assert_serves(model, ["x", None], {"x": "B"}, kit)
    assert model.memory_stats().in_use == 0


# generate -------------------------------------------------------------------------------------------------
def generate(model, name, n=8):
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=[name], do_sample=False,
                             max_new_tokens=n, pad_token_id=0, eos_token_id=None)
    tokens = out[0, len(PROMPT):].tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def test_generate_after_unload_and_load_and_after_evict(kit):
    model = kit.wrapped(max_loras=1)
    path = kit.copy("A", "generate")
    model.load_adapter("x", path)
    assert generate(model, "x") == kit.tokens("A")
    model.unload_adapter("x")
    model.load_adapter("x", kit.paths["B"])
    assert generate(model, "x") == kit.tokens("B")
    model.unload_adapter("x")
    model.register_adapter("x", path)
    assert generate(model, "x") == kit.tokens("A")
    kit.rewrite(path, "C")
    assert model.evict_adapter("x")
    assert generate(model, "x") == kit.tokens("C")
    kit.rewrite(path, "A")


def test_generate_keeps_the_version_it_started_with(kit):
    """A replace and an unload + register in the middle of `generate`: that generation finishes on
    the adapter it started with, the next one runs on the new files."""
    for change in ("replace", "reload"):
        model = kit.wrapped(max_loras=2)
        model.load_adapter("x", kit.paths["A"])
        calls = []

        def publish(module, args, output):
            calls.append(1)
            if len(calls) == 2:
                if change == "replace":
                    model.load_adapter("x", kit.paths["B"], replace=True)
                else:
                    model.unload_adapter("x")
                    model.load_adapter("x", kit.paths["B"])

        handle = model.hf_model.register_forward_hook(publish)
        assert generate(model, "x") == kit.tokens("A"), change
        handle.remove()
        assert generate(model, "x") == kit.tokens("B"), change
        assert model.memory_stats().in_use == 0


# the engine -----------------------------------------------------------------------------------------------
def run(engine, requests: dict, between=None) -> dict:
    """Add {request id: adapter} requests, step until done (calling `between(step)` after each step);
    returns {request id: tokens}."""
    for rid, adapter in requests.items():
        engine.add_request(rid, prompt_token_ids=PROMPT, lora_request=adapter,
                           sampling_params=SamplingParams(max_new_tokens=8, temperature=0))
    done, step = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.outputs[0].finish_reason in ("stop", "length"), out.error
                done[out.request_id] = out.outputs[0].token_ids
        if between is not None:
            between(step)
        step += 1
    return done


@pytest.mark.parametrize("max_loras", [1, 2])
def test_engine_serves_the_new_files_after_every_kind_of_change(kit, max_loras):
    model = kit.wrapped(max_loras=max_loras)
    engine = Engine(model, kit.tokenizer, load_entrypoints=False)
    path = kit.copy("A", f"engine{max_loras}")
    model.register_adapter("x", path)
    model.register_adapter("y", kit.paths["C"])
    assert run(engine, {"a1": "x", "c1": "y"}) == {"a1": kit.tokens("A"), "c1": kit.tokens("C")}
    model.unload_adapter("x")
    model.load_adapter("x", kit.paths["B"])
    assert run(engine, {"b1": "x"}) == {"b1": kit.tokens("B")}
    model.load_adapter("x", path, replace=True)
    assert run(engine, {"a2": "x", "c2": "y"}) == {"a2": kit.tokens("A"), "c2": kit.tokens("C")}
    kit.rewrite(path, "B")
    assert model.evict_adapter("x")
    assert run(engine, {"b2": "x"}) == {"b2": kit.tokens("B")}
    kit.rewrite(path, "A")
    engine.close()


@pytest.mark.parametrize("change", ["replace", "reload"])
def test_running_requests_finish_on_their_version(kit, change):
    """While "x" runs, its files are published again under the same name: the running request
    finishes on the old weights, a request added afterwards runs on the new ones."""
    model = kit.wrapped(max_loras=2)
    engine = Engine(model, kit.tokenizer, load_entrypoints=False)
    model.load_adapter("x", kit.paths["A"])

    def publish(step):
        if step == 2:
            if change == "replace":
                model.load_adapter("x", kit.paths["B"], replace=True)
            else:
                model.unload_adapter("x")
                model.load_adapter("x", kit.paths["B"])
            engine.add_request("new", prompt_token_ids=PROMPT, lora_request="x",
                               sampling_params=SamplingParams(max_new_tokens=8, temperature=0))

    done = run(engine, {"old": "x"}, between=publish)
    assert done == {"old": kit.tokens("A"), "new": kit.tokens("B")}
    assert model.memory_stats().in_use == 0 and model.adapters["x"].path == kit.paths["B"]
    engine.close()


# HTTP -----------------------------------------------------------------------------------------------------
def test_http_unload_then_load_under_the_same_name(kit):
    model = kit.wrapped(max_loras=2)
    engine = Engine(model, kit.tokenizer, load_entrypoints=False)
    prompt = kit.tokenizer.decode(PROMPT)
    prompt_ids = kit.tokenizer.encode(prompt)

    def tgi_tokens(url):
        body = {"inputs": prompt, "parameters": {"adapter_id": "x", "max_new_tokens": 8, "details": True}}
        r = httpx.post(url + "/generate", json=body, timeout=30)
        assert r.status_code == 200, r.text
        return [t["id"] for t in r.json()["details"]["tokens"]]

    def completion(url):
        body = {"model": "x", "prompt": prompt, "max_tokens": 8, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with running_server(create_app(engine, served_model_name="tiny",
                                   access=AccessPolicy(allow_runtime_lora_updates=True))) as url:
        for name in ("A", "B", "C"):  # loaded at runtime: the clients' to unload and load again
            if name != "A":
                assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 200
            r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": kit.paths[name]})
            assert r.status_code == 200, r.text
            want = kit.tokens(name, prompt_ids)
            assert tgi_tokens(url) == want, name
            assert completion(url).strip() == kit.tokenizer.decode(want, skip_special_tokens=True), name
            models = httpx.get(url + "/v1/models").json()["data"]
            assert any(m["id"] == "x" and m["root"] == kit.paths[name] for m in models)
    engine.close()
