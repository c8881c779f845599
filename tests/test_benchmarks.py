"""The benchmark scripts still run (smoke runs at tiny sizes; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_cache_quick(tmp_path, capsys):
    out = tmp_path / "cache.json"
    assert load("bench_cache").main(["--quick", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {(r["n"], r["alpha"]) for r in results["hit_rates"]} == {(8, 0.1), (8, 1.0), (100, 0.1), (100, 1.0)}
    for r in results["hit_rates"]:
        assert 0 <= r["gpu_hit_rate"] <= 1 and r["disk_loads_per_1k"] <= r["slot_loads_per_1k"]
    assert results["registration"]["adapters"] == 50
    assert "| ours: CPU → slot |" in capsys.readouterr().out


def test_bench_engine_quick():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_engine.py"), "--quick", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| n | adapters used | engine tok/s |" in done.stdout
    assert "| 4 | engine |" in done.stdout and "| 4 | peft |" in done.stdout
    assert "engine tokens vs PEFT over 16 requests: identical" in done.stdout


def test_bench_server_quick(capsys):
    assert load("bench_server").main(["--quick"]) == 0  # the clients in a process of their own
    out = capsys.readouterr().out
    assert "streamed text equal to direct and closed loop: 24/24" in out
    assert "client process CPU ms / token" in out


def test_bench_ray_quick():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_ray.py"), "--quick"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tokens equal in both runs: 24/24" in done.stdout
    assert "| 2 | 2 |" in done.stdout  # both replicas served
    assert "| 1.0 | 6 | 18 |" in done.stdout
