"""The GPU kit (benchmarks/gpu/run.py) runs end to end on CPU (`--dry-run`), so that it is ready the
moment a GPU is lent; the launch configs it tunes are read back for the device they were tuned on."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from multilora_plugin.kernels import tuning

from .conftest import TRITON_MISSING

pytestmark = pytest.mark.slow  # every part of the GPU kit, on CPU

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_tuning(monkeypatch):
    tuning.clear_cache()
    yield monkeypatch
    tuning.clear_cache()


def test_tuned_configs_are_read_for_their_device_and_the_nearest_size(tmp_path, fresh_tuning):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"device": "NVIDIA H200", "configs": {"bgmv_shrink": {
        tuning.key(1, 16, 4096): {"block_k": 512, "split_k": 8, "num_warps": 2, "block_r": 16},
        tuning.key(64, 16, 4096): {"block_k": 128, "split_k": 1, "num_warps": 8, "block_r": 16},
    }}}))
    fresh_tuning.setenv("MULTILORA_TUNED_CONFIGS", str(path))
    assert tuning.config("bgmv_shrink", 1, 16, 4096) == tuning.LaunchConfig(block_k=512, split_k=8, num_warps=2)
    assert tuning.config("bgmv_shrink", 2, 16, 4096).block_k == 512  # nearest tuned size: 1
    assert tuning.config("bgmv_shrink", 32, 16, 4096).block_k == 128  # nearest: 64
    # another rank, features or op: the untuned default
    assert tuning.config("bgmv_shrink", 1, 64, 4096) == tuning.default_config("bgmv_shrink", 1, 64, 4096)
    assert tuning.config("sgmv_shrink", 16, 16, 4096) == tuning.default_config("sgmv_shrink", 16, 16, 4096)
    fresh_tuning.delenv("MULTILORA_TUNED_CONFIGS")
    tuning.clear_cache()
    assert tuning.config("bgmv_shrink", 1, 16, 4096) == tuning.default_config("bgmv_shrink", 1, 16, 4096)
    assert tuning.device_slug("NVIDIA H200") == "nvidia-h200"


def test_every_committed_tuned_file_reads_back():
    for path in sorted(tuning.TUNED_DIR.glob("*.json")):
        table = tuning.read_table(path)
        assert set(table) <= set(tuning.OPS) and all(table.values()), path.name


@pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed")
def test_the_gpu_kit_dry_run_runs_every_part(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "run.py"), "--out", str(tmp_path),
                           "--dry-run"], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    results = json.loads((tmp_path / "results.json").read_text())
    status = {p["name"]: p["status"] for p in results["parts"]}
    assert done.returncode == 0, (status, done.stderr[-3000:], (tmp_path / "summary.md").read_text()[-6000:])
    assert list(status) == ["correctness", "kernels", "tuning", "decode", "moe", "qlora", "engine"]
    parts = {p["name"]: p for p in results["parts"]}
    assert parts["correctness"]["data"]["tests"] >= 90  # collected (skipped here: no GPU)
    kernels = parts["kernels"]["data"]
    assert kernels["all_agree"] and {r["pattern"] for r in kernels["results"]} == {"distinct", "identical"}
    assert set(kernels["results"][0]["us"]) == {"triton", "ours", "gather_bmm"}
    tuned = tuning.read_table(tmp_path / "tuned" / "dry-run.json")
    assert set(tuned) == set(tuning.OPS)
    decode = parts["decode"]["data"]
    assert decode["base_rows_equal"] and set(decode["results"]) == {
        "base", "wrapped, 0 adapters", "wrapped, 1 adapter", "wrapped, 4 adapters"}
    assert all(r["eager"]["ms"] > 0 for r in decode["results"].values())
    for name in ("moe", "qlora"):
        data = parts[name]["data"]
        assert data["tokens_match_peft"] and all(v > 0 for v in data["tokens_per_s"].values()), name
    engine = parts["engine"]["data"]["results"]
    assert all(engine[name]["requests_done"] == 8 for name in ("engine", "no-adapter", "generate_batch"))
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"## {name}: ok" in summary for name in status)
