"""Plugins: the hook specs match docs/hooks.md; each hook is called with the documented arguments at
the documented moment; an installed package is found through its entry point; a failing plugin
fails only what it should."""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import inspect
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import multilora_plugin
from multilora_plugin import Engine, LoRARequest, SamplingParams
from multilora_plugin.errors import AdapterLoadError, AdapterNotFoundError, PluginError, RequestRejected
from multilora_plugin.hooks import Plugins, specs
from tests.plugins import faulty
from tests.plugins.recording import Recorder
from tests.test_engine import NAMES, Kit, drive

ROOT = pathlib.Path(__file__).resolve().parent.parent
GREEDY = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return Kit(tmp_path_factory.mktemp("hook_adapters"))


def engine_for(kit, plugins=(), max_loras=2, **kwargs):
    return Engine(kit.wrapped(max_loras=max_loras, **kwargs.pop("wrap", {})), kit.tokenizer, plugins=plugins,
                  load_entrypoints=False, **kwargs)


def hook_specs():
    return {name: fn for name, fn in inspect.getmembers(specs, inspect.isfunction)
            if hasattr(fn, "multilora_plugin_spec")}


def test_every_hook_is_documented_with_its_signature():
    doc = (ROOT / "docs" / "hooks.md").read_text()
    headings = set(re.findall(r"^## `(multilora_\w+)\(([^)]*)\)`$", doc, flags=re.M))
    documented = {name: args for name, args in headings}
    hooks = hook_specs()
    assert len(hooks) >= 9
    for name, fn in hooks.items():
        assert name in documented, f"{name} has no section in docs/hooks.md"
        assert documented[name] == ", ".join(inspect.signature(fn).parameters), name
    assert set(documented) == set(hooks), "docs/hooks.md documents a hook that specs.py does not have"


def test_event_sequence_of_a_scripted_run(kit):
    """Two slots' worth of adapters for three adapters, one CPU copy beyond the slots: loads, slot
    evictions, CPU evictions, finishes, each at its moment."""
    recorder = Recorder()
    engine = engine_for(kit, [recorder], max_loras=1, max_prefetch=0, wrap=dict(max_cpu_loras=1))
    engine.add_request("a", prompt_token_ids=[5, 6], sampling_params=GREEDY, lora_request="task0")
    engine.add_request("b", prompt_token_ids=[7], sampling_params=GREEDY, lora_request="task1")
    engine.add_request("base", prompt_token_ids=[8, 9], sampling_params=GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    calls = recorder.calls
    assert calls[0] == ("register_adapters", tuple(NAMES))
    assert calls[1:4] == [("request_received", "a", "task0"), ("request_received", "b", "task1"),
                          ("request_received", "base", None)]
    assert recorder.names("adapter_loaded", "adapter_evicted", "request_finished") == [
        ("adapter_loaded", "task0", "cpu", None), ("adapter_loaded", "task0", "gpu", 0),
        # a and base run in the same steps; the base row was admitted first (its "adapter" is always resident)
        ("request_finished", "base", "length"), ("request_finished", "a", "length"),
        # b's step: read task1, take task0's slot, then drop task0's CPU copy (one CPU copy beyond the slots)
        ("adapter_loaded", "task1", "cpu", None), ("adapter_evicted", "task0", "gpu"),
        ("adapter_loaded", "task1", "gpu", 0), ("adapter_evicted", "task0", "cpu"),
        ("request_finished", "b", "length"),
    ]
    steps = recorder.names("batch_scheduled", "step_finished")
    assert [c[0] for c in steps] == ["batch_scheduled", "step_finished"] * (len(steps) // 2)
    assert steps[0] == ("batch_scheduled", 0, ("base", "a"))  # adapter_affinity: the base model is always resident
    assert sum(c[2] for c in steps if c[0] == "step_finished") == 9 == engine.stats().generated_tokens
    first_b = next(i for i, c in enumerate(calls) if c[0] == "batch_scheduled" and "b" in c[2])
    assert [c[0] for c in calls[first_b + 1:first_b + 6]] == ["adapter_loaded", "adapter_evicted", "adapter_loaded",
                                                              "adapter_evicted", "step_finished"], "in b's step"
    engine.model.unload_adapter("task1")
    assert recorder.calls[-2:] == [("adapter_evicted", "task1", "gpu"), ("adapter_evicted", "task1", "cpu")]


def test_an_abort_is_reported_as_finished(kit):
    recorder = Recorder()
    engine = engine_for(kit, [recorder])
    engine.add_request("x", prompt_token_ids=[5], sampling_params=SamplingParams(max_new_tokens=9, temperature=0),
                       lora_request="task2")
    engine.step()
    engine.abort_request("x")
    engine.step()
    assert recorder.names("request_finished") == [("request_finished", "x", "abort")]


def test_failing_observers_never_stop_the_engine(kit):
    engine = engine_for(kit, [faulty.FailsToObserve()])
    requests = [([5, 6, 7], "task0", 4, 0), ([8, 9], "task1", 4, 1), ([10], None, 3, 1), ([11, 12], "task2", 3, 2)]
    done = drive(engine, requests)
    for i, (prompt, adapter, n, _) in enumerate(requests):
        assert done[i].outputs[0].token_ids == kit.alone(prompt, adapter, n, eos=False), i
    errors = {hook: count for (plugin, hook), count in engine.plugins.errors.items()}
    assert errors["multilora_register_adapters"] == 1
    assert errors["multilora_request_finished"] == len(requests)
    assert errors["multilora_step_finished"] == errors["multilora_batch_scheduled"] == engine.stats().steps
    # three adapters, two slots: each read (cpu) and placed (gpu) once, one slot given up
    assert errors["multilora_adapter_loaded"] == 6 and errors["multilora_adapter_evicted"] == 1
    assert {plugin for plugin, _ in engine.plugins.errors} == {"FailsToObserve"}
    assert engine.stats().finished == len(requests), "the statistics plugin still sees every request"


def run_all(engine):
    """Step until nothing is left; {request id: final output}."""
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return done


def test_a_failing_router_fails_its_request_alone(kit):
    engine = engine_for(kit, [faulty.FailsToRoute()])
    with pytest.raises(PluginError, match=r"request 'c' failed in plugin .* the router crashed"):
        engine.add_request("c", prompt_token_ids=[5], sampling_params=GREEDY, metadata={"crash": True})
    with pytest.raises(RequestRejected, match="tenant over quota"):
        engine.add_request("r", prompt_token_ids=[5], sampling_params=GREEDY, metadata={"reject": True})
    engine.add_request("ok", prompt_token_ids=[5], sampling_params=GREEDY, lora_request="task3")
    done = run_all(engine)
    assert list(done) == ["ok"] and done["ok"].outputs[0].token_ids == kit.alone([5], "task3", 3, eos=False)
    errors = {hook: count for (_, hook), count in engine.plugins.errors.items()}
    assert errors == {"multilora_request_received": 1}


def test_llm_generate_reports_rejections_per_prompt(kit):
    class RejectOdd:
        @multilora_plugin.hookimpl
        def multilora_request_received(self, request):
            if request.prompt_token_ids[0] % 2:
                raise RequestRejected(f"odd first token {request.prompt_token_ids[0]}")

    llm = multilora_plugin.LLM(kit.wrapped(), kit.tokenizer, plugins=[RejectOdd()], load_entrypoints=False)
    outs = llm.generate([[4, 5], [5, 6], [6, 7]], GREEDY, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "error", "length"]
    assert isinstance(outs[1].error, RequestRejected) and "odd first token 5" in str(outs[1].error)


def test_resolver_failures_and_answers(kit, tmp_path):
    engine = engine_for(kit, [faulty.FailsToResolve()])
    with pytest.raises(PluginError, match="the store is down"):
        engine.add_request("x", prompt_token_ids=[5], sampling_params=GREEDY, lora_request="elsewhere")

    class Store:
        @multilora_plugin.hookimpl
        def multilora_resolve_adapter(self, name):
            return kit.paths.get(name.removeprefix("store/"))

    model = multilora_plugin.wrap(copy.deepcopy(kit.base), max_loras=2)
    engine = Engine(model, kit.tokenizer, plugins=[Store()], load_entrypoints=False)
    engine.add_request("y", prompt_token_ids=[5, 6], sampling_params=GREEDY, lora_request="store/task4")
    with pytest.raises(AdapterNotFoundError, match="'store/nope' is not registered"):
        engine.add_request("z", prompt_token_ids=[5], sampling_params=GREEDY, lora_request="store/nope")
    done = run_all(engine)
    assert engine.model.adapters["store/task4"].path == kit.paths["task4"]
    assert done["y"].outputs[0].token_ids == kit.alone([5, 6], "task4", 3, eos=False)


def test_weights_from_a_plugin_store(kit, tmp_path):
    """An adapter whose directory holds only its config is served from tensors a plugin keeps in
    memory; a store that fails fails only that adapter's requests."""
    config_only = tmp_path / "memory_adapter"
    config_only.mkdir()
    shutil.copy(os.path.join(kit.paths["task5"], "adapter_config.json"), config_only)
    tensors = load_file(os.path.join(kit.paths["task5"], "adapter_model.safetensors"))

    class Memory:
        @multilora_plugin.hookimpl
        def multilora_load_adapter_weights(self, source):
            return tensors if source.name == "memory" else None

    engine = engine_for(kit, [Memory(), faulty.FailsToLoad("task6")])
    engine.model.register_adapter("memory", config_only)
    requests = [([5, 6, 7], "memory", 4, 0), ([8, 9], "task6", 4, 0), ([10, 11], "task0", 4, 0)]
    done = drive(engine, requests)
    assert done[0].outputs[0].token_ids == kit.alone([5, 6, 7], "task5", 4, eos=False)
    assert done[1].outputs[0].finish_reason == "error" and isinstance(done[1].error, AdapterLoadError)
    assert "object storage timed out" in str(done[1].error)
    assert done[2].outputs[0].token_ids == kit.alone([10, 11], "task0", 4, eos=False)


def test_bad_weights_from_a_plugin_are_refused(kit, tmp_path):
    class Junk:
        @multilora_plugin.hookimpl
        def multilora_load_adapter_weights(self, source):
            return {"not.a.lora.weight": torch.zeros(2)} if source.name == "task1" else ["junk"]

    engine = engine_for(kit, [Junk()])
    done = drive(engine, [([5], "task1", 2, 0), ([6], "task2", 2, 0)])
    assert "which is no LoRA weight this project serves" in str(done[0].error)
    assert "should be a PEFT state dict" in str(done[1].error)


def test_adapter_directory_registers_and_finds_new_adapters(kit, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    for name in ("task0", "task1"):
        shutil.copytree(kit.paths[name], root / name)
    (root / "notes").mkdir()  # not an adapter
    model = multilora_plugin.wrap(copy.deepcopy(kit.base), max_loras=2)
    engine = Engine(model, kit.tokenizer, adapter_dir=root, load_entrypoints=False)
    assert list(model.adapters) == ["task0", "task1"]
    shutil.copytree(kit.paths["task7"], root / "task7")  # appears while the engine runs
    engine.add_request("new", prompt_token_ids=[5, 6], sampling_params=GREEDY, lora_request="task7")
    for bad in ("../adapters/task0", "notes"):
        with pytest.raises(AdapterNotFoundError):
            engine.add_request(f"bad-{bad}", prompt_token_ids=[5], sampling_params=GREEDY, lora_request=bad)
    done = run_all(engine)
    assert done["new"].outputs[0].token_ids == kit.alone([5, 6], "task7", 3, eos=False)
    with pytest.raises(multilora_plugin.ConfigError, match="is not a directory"):
        Engine(model, adapter_dir=tmp_path / "missing", load_entrypoints=False)


def test_a_plugin_that_fails_to_import_is_named(monkeypatch):
    broken = importlib.metadata.EntryPoint("broken_plugin", "no_such_module_anywhere:Plugin", "multilora_plugin")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [broken] if kw.get("group") == "multilora_plugin" else real(**kw))
    with pytest.raises(PluginError, match=r"'broken_plugin' \(entry point broken_plugin = "
                                          r"no_such_module_anywhere:Plugin .*failed to import: ModuleNotFoundError"):
        Plugins()
    assert Plugins(load_entrypoints=False).names() == []


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """pip-install the example plugin package into this environment for this module's tests."""
    package = ROOT / "tests" / "plugins" / "example_router"
    build = tmp_path_factory.mktemp("example_router_build")
    shutil.copytree(package, build / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", str(build / "src")], check=True,
                   capture_output=True, cwd=build)
    importlib.invalidate_caches()
    yield "multilora-example-router"
    subprocess.run(pip + ["uninstall", "--yes", "multilora-example-router"], check=True, capture_output=True)
    sys.modules.pop("multilora_example_router", None)
    importlib.invalidate_caches()


def test_an_installed_package_is_found_through_its_entry_point(kit, installed_example, tmp_path, monkeypatch):
    root = tmp_path / "tasks"
    root.mkdir()
    for task, adapter in (("sql", "task0"), ("chat", "task3")):
        shutil.copytree(kit.paths[adapter], root / task)
    monkeypatch.setenv("MULTILORA_EXAMPLE_ADAPTERS", str(root))
    model = multilora_plugin.wrap(copy.deepcopy(kit.base), max_loras=2)
    engine = Engine(model, kit.tokenizer)  # entry points on: the example package is loaded
    assert "example_router" in engine.plugins.names()
    assert set(model.adapters) == {"sql", "chat"}
    engine.add_request("q1", prompt_token_ids=[5, 6], sampling_params=GREEDY, metadata={"task": "sql"})
    engine.add_request("q2", prompt_token_ids=[7, 8], sampling_params=GREEDY, metadata={"task": "chat"})
    engine.add_request("q3", prompt_token_ids=[9], sampling_params=GREEDY, lora_request=LoRARequest(
        "task1", 1, kit.paths["task1"]))  # no task: its own adapter
    with pytest.raises(RequestRejected, match="no adapter serves task 'poetry'"):
        engine.add_request("q4", prompt_token_ids=[5], sampling_params=GREEDY, metadata={"task": "poetry"})
    done = run_all(engine)
    assert done["q1"].outputs[0].token_ids == kit.alone([5, 6], "task0", 3, eos=False)
    assert done["q2"].outputs[0].token_ids == kit.alone([7, 8], "task3", 3, eos=False)
    assert done["q3"].outputs[0].token_ids == kit.alone([9], "task1", 3, eos=False)
    assert "example_router" not in Engine(model, load_entrypoints=False).plugins.names()


def test_close_detaches_the_engine_from_the_model(kit):
    recorder = Recorder()
    engine = engine_for(kit, [recorder])
    engine.add_request("left", prompt_token_ids=[5], sampling_params=GREEDY, lora_request="task0")
    engine.close()
    assert engine.model.weights_provider is None and engine.plugins.adapter_event not in engine.cache.listeners
    assert [o.outputs[0].finish_reason for o in engine.step()] == ["abort"]
    before = len(recorder.calls)
    engine.model.load_adapter("late", kit.paths["task1"])
    assert not [c for c in recorder.calls[before:] if c[0].startswith("adapter_")]
