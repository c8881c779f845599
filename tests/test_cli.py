"""The `multilora` command: the demo runs end to end and checks itself against PEFT."""

from __future__ import annotations

import re

import pytest
import torch

from multilora_plugin import MultiLoRAModel, cli, demo, toy
from multilora_plugin.integrations.local import free_port, running_server


def test_demo_matches_peft(capsys):
    assert cli.main(["demo", "--new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    # the batch, then 10 engine requests, then 12 HTTP requests (6 TGI, 6 OpenAI)
    assert out.count("  matches PEFT") == len(demo.DEMO_ROWS) + 10 + 12
    assert "continuous batching: 10 requests over 4 adapters + base, max_loras=2" in out
    assert out.count("  TGI    adapter=") == 6 and out.count("  OpenAI adapter=") == 6
    assert "every output matches PEFT" in out
    for name in toy.DEMO_ADAPTERS:
        assert f"loaded adapter {name!r}" in out


def test_demo_reports_a_mismatch(monkeypatch, capsys):
    """The demo's check can fail: serve every row with the base model and the adapter rows differ."""
    real_generate = MultiLoRAModel.generate

    def base_only(self, *args, adapter_names=None, **kwargs):
        return real_generate(self, *args, adapter_names=[None] * len(adapter_names), **kwargs)

    monkeypatch.setattr(MultiLoRAModel, "generate", base_only)
    assert cli.main(["demo", "--new-tokens", "6"]) == 1
    out = capsys.readouterr().out
    adapter_rows = sum(name is not None for name, _ in demo.DEMO_ROWS)
    assert out.count("DIFFERS FROM PEFT") == adapter_rows
    assert f"{adapter_rows} output(s) differ from PEFT" in out


@pytest.mark.parametrize("engine", [[], ["--no-engine-process"], ["--engine", "transformers"]],
                         ids=["engine-process", "engine-in-process", "transformers-cb"])
def test_serve_a_model_directory(monkeypatch, tmp_path, engine):
    """`multilora serve --model DIR --adapter NAME=PATH` loads both from disk and serves them; the
    app uvicorn would run is started here on a free port and asked for one completion per model.
    The engine runs in a process of its own, in this one (--no-engine-process), or is transformers'
    continuous batching."""
    import httpx
    import uvicorn

    from multilora_plugin import toy

    base = toy.tiny_model("llama", vocab_size=128)
    base.save_pretrained(tmp_path / "model")
    toy.tiny_tokenizer(128).save_pretrained(tmp_path / "model")
    adapter = toy.make_adapter(base, tmp_path / "sql", r=4)
    answers = {}

    real_run = uvicorn.Server.run

    def run(server):
        app, host, port = server.config.app, server.config.host, server.config.port
        if port != 8123:  # running_server's own, below
            return real_run(server)
        answers["bind"] = (host, port)
        answers["threads"] = torch.get_num_threads()
        with running_server(app) as url:
            for model in ("sql", "tiny"):
                body = {"model": model, "prompt": "the water at night", "max_tokens": 4, "temperature": 0}
                answers[model] = httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"]
            answers["models"] = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]

    monkeypatch.setattr(uvicorn.Server, "run", run)
    args = ["serve", "--model", str(tmp_path / "model"), "--adapter", f"sql={adapter}", "--max-loras", "2",
            "--served-model-name", "tiny", "--port", "8123", "--cpu-threads", "1"]
    args += engine
    threads = torch.get_num_threads()
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert answers["bind"] == ("127.0.0.1", 8123)
    if engine:  # else set in the engine's process
        assert answers["threads"] == 1
    assert answers["models"] == ["tiny", "sql"]
    assert answers["sql"] and answers["tiny"] and answers["sql"] != answers["tiny"]


def test_serve_refuses_a_bad_adapter_argument(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--adapter", "no-equals-sign"])
    assert "expected NAME=PATH" in capsys.readouterr().err


def test_a_command_is_required():
    with pytest.raises(SystemExit):
        cli.main([])


@pytest.mark.slow  # a server in a process of its own, stopped twice
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_serve_shuts_down_the_same_way_on_sigterm_and_ctrl_c(tmp_path, sig):
    """`kill PID` (how process managers stop a server) and Ctrl-C both close the engine and remove
    the demo adapters' temporary directory; the process exits 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "multilora_plugin.cli", "serve", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert any(p.name.startswith("multilora-serve-") for p in tmp_path.iterdir())
        proc.send_signal(getattr(signal, sig))
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "engine closed" in out and "multilora serve: stopped" in out, out
    assert not any(p.name.startswith("multilora-serve-") for p in tmp_path.iterdir()), list(tmp_path.iterdir())


def test_help_and_version_answer_at_once_without_torch():
    """`multilora --help` / `--version` import neither torch nor transformers (well under a second)."""
    import subprocess
    import sys
    import time

    code = ("import sys, runpy; sys.argv = ['multilora'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('multilora_plugin.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    for args in (["--help"], ["--version"], ["serve", "--help"], ["demo", "--help"]):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        seconds = time.perf_counter() - start
        assert "heavy: []" in done.stdout, (args, done.stdout, done.stderr)
        assert seconds < 5, (args, seconds)  # a bare interpreter start included; about 0.2 s on a quiet machine
    serve_help = subprocess.run([sys.executable, "-m", "multilora_plugin.cli", "serve", "--help"],
                                capture_output=True, text=True, timeout=60).stdout
    assert "--allow-runtime-lora-updates" in serve_help and "(default: 127.0.0.1)" in serve_help
    version = subprocess.run([sys.executable, "-m", "multilora_plugin.cli", "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    assert version.startswith("multilora_plugin 0.")


@pytest.mark.slow  # two processes that import torch
def test_a_bad_model_or_adapter_path_is_one_line(tmp_path):
    import subprocess
    import sys

    for args in (["--model", str(tmp_path / "missing")], ["--adapter", f"x={tmp_path / 'missing'}"]):
        done = subprocess.run([sys.executable, "-m", "multilora_plugin.cli", "serve", *args, "--port", "1"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].startswith("multilora serve:")
        assert str(tmp_path / "missing") in done.stderr and "Repo id" not in done.stderr


@pytest.mark.parametrize("model,words", [
    ("/nonexistent", "the path '/nonexistent' does not exist"),
    ("./missing/model", "the path './missing/model' does not exist"),
    ("~/missing", "the path '~/missing' does not exist"),
    ("a/b/c", "the path 'a/b/c' does not exist"),
])
def test_a_model_path_that_is_not_there_is_named(model, words):
    from multilora_plugin.errors import ConfigError
    from multilora_plugin.integrations.engine_args import EngineArgs

    with pytest.raises(ConfigError, match=re.escape(words)):
        EngineArgs(model=model)
    with pytest.raises(ConfigError, match="`tokenizer` should be"):
        EngineArgs(model="org/name", tokenizer=model)


def test_hub_ids_and_directories_are_left_to_transformers(tmp_path):
    from multilora_plugin.errors import ConfigError
    from multilora_plugin.integrations.engine_args import EngineArgs

    for model in ("org/name", "gpt2", str(tmp_path)):
        EngineArgs(model=model)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        EngineArgs(model=str(tmp_path / "file"))
