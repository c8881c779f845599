"""The benchmark scripts still run (smoke runs at tiny sizes; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the benchmarks' smoke runs

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_cache_quick(tmp_path):
    out = tmp_path / "cache.json"
    assert load("bench_cache").main(["--quick", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {(r["n"], r["alpha"]) for r in results["hit_rates"]} == {(8, 0.1), (8, 1.0), (100, 0.1), (100, 1.0)}
    for r in results["hit_rates"]:
        assert 0 <= r["gpu_hit_rate"] <= 1 and r["disk_loads_per_1k"] <= r["slot_loads_per_1k"]
    assert results["registration"]["adapters"] == 50


def test_bench_engine_quick(tmp_path):
    """Every contestant, transformers' continuous batching with and without adapters included."""
    out = tmp_path / "engine.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_engine.py"), "--quick", "--no-progress",
                           "--engines", "ours,transformers", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (point,) = json.loads(out.read_text())["points"]
    assert set(point["contestants"]) == {"engine", "no-adapter", "peft", "cb-lora", "cb"}
    assert all(c["tokens_per_s"] > 0 and not c["errors"] for c in point["contestants"].values())
    assert (point["mismatches"], point["cb_mismatches"], point["cb_base_mismatches"]) == (0, 0, 0)


def test_bench_server_quick(capsys):
    assert load("bench_server").main(["--quick"]) == 0  # the clients in a process of their own
    out = capsys.readouterr().out
    assert "streamed text equal to direct and closed loop: 24/24" in out
    assert "client process CPU ms / token" in out


def test_bench_ray_quick(tmp_path):
    out = tmp_path / "ray.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_ray.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["tokens_equal"] == results["requests"] == 24
    assert [(run["replicas"], run["replicas_used"]) for run in results["runs"]] == [(1, 1), (2, 2)]
    assert [(s["alpha"], s["adapters_used"]) for s in results["skews"]] == [(1.0, 6)]
    assert all(s["repeated"] == 18 for s in results["skews"])


@pytest.mark.parametrize("kind,contestants", [("moe", {"peft-1"}), ("qlora", {"peft"}),
                                              ("dora", {"peft-1", "ours-lora"}), ("saved", {"peft", "ours-lora"})])
def test_bench_kinds_quick(tmp_path, kind, contestants):
    out = tmp_path / "kind.json"
    assert load("bench_kinds").main(["--quick", "--kind", kind, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["tokens_match_peft"] and set(results["tokens_per_s"]) == {"base", "ours", *contestants}


def test_bench_eval_quick(tmp_path):
    """evaluate_adapters and one lm-eval hf + peft run per adapter give the same results."""
    pytest.importorskip("lm_eval")
    out = tmp_path / "eval.json"
    assert load("bench_eval").main(["--quick", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["results_equal"] and results["adapters"] == 2 and results["ours_s"] > 0
