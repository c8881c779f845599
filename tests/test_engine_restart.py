"""The server survives its engine: an engine process killed with -9 (as the OOM killer does) under
concurrent streams is started again with every adapter it served; one that keeps dying stops the
server with a non-zero exit and the cause on stderr."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from multilora_plugin import toy
from multilora_plugin.integrations.access import AccessPolicy
from multilora_plugin.integrations.engine_args import EngineArgs
from multilora_plugin.integrations.engine_process import EngineProcess
from multilora_plugin.integrations.local import free_port, running_server
from multilora_plugin.integrations.restarts import RestartPolicy
from multilora_plugin.integrations.server import create_app

PROMPT = "tell me a story about a little house"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return toy.demo_adapters(toy.demo_model(), tmp_path_factory.mktemp("restart-adapters"))


def wait_healthy(url: str, timeout: float = 60.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"/health did not answer 200 within {timeout} s")


def answers(url: str) -> dict:
    """Greedy answers of an operator adapter, a runtime-loaded adapter and the base model."""
    out = {}
    for model in ("sql", "code", "tiny"):
        r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8,
                                                      "temperature": 0}, timeout=30)
        assert r.status_code == 200, r.text
        out[model] = r.json()["choices"][0]["text"]
    return out


def stream(url: str, n: int) -> str:
    """One streamed request to its end: "complete", "error" (an error event) or what else happened."""
    body = {"inputs": PROMPT, "parameters": {"adapter_id": ["sql", "chat", None][n % 3], "max_new_tokens": 300}}
    events = []
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=60) as r:
        if r.status_code != 200:
            return f"status {r.status_code}"
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    if events and "error" in events[-1]:
        return "error"
    return "complete" if events and events[-1].get("generated_text") is not None else f"cut after {len(events)}"


def restarts(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "multilora_engine_restarts_total")


@pytest.mark.slow  # engine processes, each importing torch afresh
def test_a_killed_engine_comes_back_with_every_adapter_it_served(paths):
    args = EngineArgs(adapters={n: paths[n] for n in ("sql", "chat")}, max_loras=2, max_num_seqs=32, cpu_threads=1)
    backend = EngineProcess(args)
    app = create_app(backend, served_model_name="tiny", access=AccessPolicy(allow_runtime_lora_updates=True))
    with running_server(app) as url:
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "code", "lora_path": paths["code"]})
        assert r.status_code == 200, r.text
        before = answers(url)
        assert restarts(url) == 0
        first = backend.process.pid
        with ThreadPoolExecutor(24) as pool:
            streams = [pool.submit(stream, url, i) for i in range(24)]
            time.sleep(1.5)  # the streams are running
            os.kill(first, signal.SIGKILL)
            ended = [s.result(timeout=90) for s in streams]  # none hangs
        assert set(ended) <= {"complete", "error"} and "error" in ended, ended
        r = httpx.post(url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
        if r.status_code == 503:  # still starting: a retry hint, never a hang
            assert r.headers.get("retry-after") == "5" and "starting" in r.json()["error"]
        assert wait_healthy(url) < 60
        assert backend.process.pid != first and backend.fatal is None
        assert answers(url) == before
        assert restarts(url) == 1
        models = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert {"sql", "chat", "code", "tiny"} <= models
    assert not backend.process.is_alive()  # a clean shutdown restarts nothing


@pytest.mark.slow  # engine processes, each importing torch afresh
def test_without_restarts_a_dead_engine_is_reported(paths):
    """`max_deaths=1` (vLLM's way: the server gives up with its engine): no new engine, `fatal` says
    why and names the exit code; the server answers 503."""
    fatal = []
    backend = EngineProcess(EngineArgs(adapters={"sql": paths["sql"]}, max_loras=1, cpu_threads=1),
                            restarts=RestartPolicy(max_deaths=1), on_fatal=fatal.append)
    with running_server(create_app(backend, served_model_name="tiny")) as url:
        os.kill(backend.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not fatal and time.monotonic() < deadline:
            httpx.get(url + "/health")
            time.sleep(0.1)
        assert fatal and "exit code -9" in fatal[0] and "died 1 times within 300 s" in fatal[0]
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/generate", json={"inputs": PROMPT})
        assert r.status_code == 503 and "keeps dying" in r.json()["error"]


def _engine_child(server_pid: int) -> int:
    """The pid of the engine process `multilora serve` started (a `spawn` child of the server)."""
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(proc.name)
    raise AssertionError("no engine process found")


@pytest.mark.slow  # engine processes, each importing torch afresh
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the engine process through /proc")
def test_an_engine_that_keeps_dying_stops_the_server(tmp_path, paths):
    """The engine is killed, and every new one fails to start (its model directory is gone): after
    --max-engine-deaths deaths the server exits 1, with the cause on stderr."""
    model = tmp_path / "model"
    toy.demo_model().save_pretrained(model)
    toy.demo_tokenizer().save_pretrained(model)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "multilora_plugin.cli", "serve", "--model", str(model),
                             "--adapter", f"sql={paths['sql']}", "--port", str(port), "--log-level", "warning",
                             "--max-engine-deaths", "2", "--cpu-threads", "1"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=120)
        engine = _engine_child(proc.pid)
        for path in model.iterdir():
            path.unlink()
        model.rmdir()
        os.kill(engine, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    last = err.strip().splitlines()
    assert any("the engine process ended (exit code -9)" in line for line in last), err
    fatal = next(line for line in last if line.startswith("multilora serve: "))
    assert "a new engine process failed to start" in fatal and "died 2 times within 300 s" in fatal, err
    assert "engine closed" in out


def test_the_restart_policy_counts_deaths_within_its_window():
    from multilora_plugin.errors import ConfigError

    policy = RestartPolicy(max_deaths=3, window_s=300)
    assert [policy.died(t) for t in (0, 100, 350)] == [False, False, False]  # the first left the window
    assert policy.died(399) and policy.recent_deaths == 3
    assert RestartPolicy(max_deaths=1).died(0)
    for bad in (dict(max_deaths=0), dict(window_s=0), dict(max_deaths=True)):
        with pytest.raises(ConfigError):
            RestartPolicy(**bad)
