"""The GPU kit: what a GPU can tell this project, measured in one command that fits one device call.

    python benchmarks/gpu/run.py --out DIR [--budget-s 420] [--dry-run] [--only PART ...]

Parts, in order of value; each runs in its own process (a crash or a hung kernel costs that part
only) under its own time cap, cut to what is left of `--budget-s`; a part that fails or runs out of
time is recorded with the end of its output, and the kit goes on:

  correctness  `pytest -m cuda` on the files that hold the GPU-only tests: CUDA-graph capture and
               replay of a decode step, pinned-memory slot copies on the side stream, Triton against
               the reference in bf16/fp16 at Punica's shapes, a mixed batch against PEFT on CUDA
  kernels      `bench_kernels.py --devices cuda`: Triton SGMV/BGMV vs the torch path vs gather-bmm at
               4096→4096 and 4096→11008, ranks 8/16/64, batch 1–64, four popularity patterns, bf16;
               µs per op, GB/s and the fraction of the device's memory bandwidth
  tuning       `gpu/tune.py`: a coordinate-descent search over the kernels' launch configs; the best
               go to DIR/tuned/<device>.json (commit it to multilora_plugin/kernels/tuned/), and the
               later parts already use them
  decode       `gpu/decode.py`: a Llama-2-7B-shaped decode step at batch 32, base vs 1, 8 and 32
               distinct rank-16 adapters, eager and under a CUDA graph
  moe          `bench_kinds.py`: 8 distinct LoRA adapters on experts, router and attention of a MoE model
               in one batch, against the base and PEFT one adapter at a time (bf16)
  qlora        `bench_kinds.py --kind qlora`: mixed adapters on a bitsandbytes nf4 base, against the base
               alone and PEFT's mixed batch
  engine       `gpu/engine.py`: the bench_engine workload at 1B shapes, the engine with and without
               adapters against transformers' own continuous batching

After every part, DIR/results.json (every part: status, seconds, command, its own JSON, the end of
its output) and DIR/summary.md (each part's report) are written again (the parts' own JSON files go to a
temporary directory: DIR keeps four files, within what the device tool brings back), so a run cut short still
leaves what it measured. `--dry-run` runs the same parts on CPU at tiny shapes (Triton under
TRITON_INTERPRET=1); the test suite runs it so the kit cannot rot between GPU lends.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the project need not be installed (it is not on the GPU machine's image)
    sys.path.insert(0, str(ROOT))
BENCH = ROOT / "benchmarks"
CUDA_TEST_FILES = ["tests/test_cuda.py", "tests/test_triton_ops.py", "tests/test_lifecycle.py"]
HBM_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # datasheet figures, by name


@dataclass
class Part:
    name: str
    cap_s: float  # its share of the budget at most
    command: Callable[["Context"], List[str]]
    data: Optional[str] = None  # the JSON file it writes, relative to DIR


@dataclass
class Context:
    out: pathlib.Path
    dry_run: bool
    device_name: str
    hbm_gbs: float
    tuned: pathlib.Path  # where tuning writes its configs
    parts: pathlib.Path  # where the parts write their JSON (results.json holds it: the device tool returns 8 files)

    def python(self, script: pathlib.Path, *args: str) -> List[str]:
        return [sys.executable, str(script), *args]


def correctness(ctx: Context) -> List[str]:
    return [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfEs",
            f"--junitxml={ctx.out / 'correctness.xml'}", *CUDA_TEST_FILES]


def kernels(ctx: Context) -> List[str]:
    json_out = ["--json", str(ctx.parts / "kernels.json")]
    if ctx.dry_run:
        return ctx.python(BENCH / "bench_kernels.py", "--devices", "cpu", "--contestants", "triton", "ours", "gather_bmm",
                          "--shapes", "64x128", "--ranks", "8", "4+16", "--batches", "1", "4", "--patterns", "distinct",
                          "identical", "--min-time", "0.001", "--max-reps", "2", "--warmup", "1", *json_out)
    return ctx.python(BENCH / "bench_kernels.py", "--devices", "cuda", "--shapes", "4096x4096", "4096x11008",
                      "--ranks", "8", "16", "64", "8+64", "--batches", "1", "4", "16", "32", "64", "--patterns", "distinct",
                      "uniform", "skewed", "identical", "--min-time", "0.05", "--hbm-gbs", f"{ctx.hbm_gbs:g}",
                      *json_out)


def tuning(ctx: Context) -> List[str]:
    return ctx.python(BENCH / "gpu" / "tune.py", "--out", str(ctx.tuned), "--budget-s", "130",
                      *(["--dry-run"] if ctx.dry_run else []))


def decode(ctx: Context) -> List[str]:
    return ctx.python(BENCH / "gpu" / "decode.py", "--json", str(ctx.parts / "decode.json"),
                      *(["--dry-run"] if ctx.dry_run else []))


def engine(ctx: Context) -> List[str]:
    return ctx.python(BENCH / "gpu" / "engine.py", "--preset", "1b", "--json", str(ctx.parts / "engine.json"),
                      *(["--dry-run"] if ctx.dry_run else []))


def moe(ctx: Context) -> List[str]:
    """8 distinct all-linear adapters on a Mixtral-shaped MoE (experts and router included) in one batch."""
    size = ["--quick"] if ctx.dry_run else ["--device", "cuda", "--dtype", "bfloat16", "--hidden", "1024",
                                             "--layers", "8", "--experts", "8", "--intermediate", "1024",
                                             "--batch", "32", "--new-tokens", "32", "--vocab", "32000"]
    return ctx.python(BENCH / "bench_kinds.py", "--kind", "moe", *size, "--json", str(ctx.parts / "moe.json"))


def qlora(ctx: Context) -> List[str]:
    """Mixed adapters on a bitsandbytes nf4 base against the base alone and PEFT's mixed batch."""
    size = ["--quick"] if ctx.dry_run else ["--device", "cuda", "--dtype", "bfloat16", "--hidden", "2048",
                                             "--layers", "8", "--intermediate", "5504", "--batch", "32",
                                             "--new-tokens", "32", "--vocab", "32000"]
    return ctx.python(BENCH / "bench_kinds.py", "--kind", "qlora", *size, "--json", str(ctx.parts / "qlora.json"))


PARTS = [
    Part("correctness", 150, correctness),
    Part("kernels", 110, kernels, "kernels.json"),
    Part("tuning", 150, tuning),
    Part("decode", 150, decode, "decode.json"),
    Part("moe", 75, moe, "moe.json"),
    Part("qlora", 60, qlora, "qlora.json"),
    Part("engine", 150, engine, "engine.json"),
]
MIN_PART_S = 20  # a part is not started with less than this left


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the folder for results.json, summary.md and each part's files")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="seconds for the whole run (default 420: one device call with its start, and room to rerun)")
    p.add_argument("--dry-run", action="store_true", help="the same parts on CPU at tiny shapes")
    p.add_argument("--only", nargs="+", choices=[part.name for part in PARTS], help="run these parts only")
    return p.parse_args(argv)


def describe_device(dry_run: bool) -> tuple:
    """(device name, memory bandwidth in GB/s, where that figure came from)."""
    import torch

    if dry_run or not torch.cuda.is_available():
        return "cpu", 0.0, "none (no GPU)"
    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate: two transfers per clock
        return name, 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "the device's memory clock and bus width"
    known = next((gbs for key, gbs in HBM_GBS.items() if key in name), 4800.0)
    return name, known, "the datasheet figure for its name" if any(k in name for k in HBM_GBS) else "H200's, assumed"


def tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


def run_part(part: Part, ctx: Context, seconds: float, env: Dict[str, str]) -> dict:
    command = part.command(ctx)
    started = time.perf_counter()
    record = dict(name=part.name, command=" ".join(command), timeout_s=round(seconds, 1))
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds)
        record.update(rc=done.returncode, status="ok" if done.returncode == 0 else "failed",
                      stdout=done.stdout, stderr_tail=tail(done.stderr))
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        record.update(rc=None, status="timeout", stdout=out, stderr_tail=tail(err))
    record["seconds"] = round(time.perf_counter() - started, 1)
    junit = ctx.out / "correctness.xml"
    if part.name == "correctness" and junit.is_file():
        import xml.etree.ElementTree as ElementTree

        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        record["data"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    if part.data and (ctx.parts / part.data).is_file():
        try:
            record["data"] = json.loads((ctx.parts / part.data).read_text())
        except ValueError as exc:
            record["data_error"] = str(exc)
    return record


def summary(results: dict) -> str:
    lines = [f"# GPU kit: {results['device']}", "",
             f"{'dry run, ' if results['dry_run'] else ''}budget {results['budget_s']:g} s; torch {results['torch']}, "
             f"triton {results['triton']}, transformers {results['transformers']}, python {results['python']}; "
             f"memory bandwidth {results['hbm_gbs']:g} GB/s ({results['hbm_source']})", ""]
    for part in results["parts"]:
        lines += [f"## {part['name']}: {part['status']} ({part.get('seconds', 0):g} s)", "",
                  f"`{part.get('command', '')}`", ""]
        body = part.get("stdout", "").strip()
        if part["status"] in ("failed", "timeout"):
            body += "\n\n" + part.get("stderr_tail", "").strip()
        lines += [tail(body, 12000) if body else "(no output)", ""]
    return "\n".join(lines)


def write(results: dict, out: pathlib.Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "summary.md").write_text(summary(results))


def versions() -> dict:
    found = {}
    for name in ("torch", "triton", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - reported as missing
            found[name] = "missing"
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    device_name, hbm_gbs, hbm_source = describe_device(args.dry_run)
    from multilora_plugin.kernels.tuning import device_slug

    tuned = out / "tuned" / f"{device_slug(device_name if not args.dry_run else 'dry-run')}.json"
    ctx = Context(out, args.dry_run, device_name, hbm_gbs, tuned, pathlib.Path(tempfile.mkdtemp(prefix="gpu_kit_")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    results = dict(device=device_name, dry_run=args.dry_run, budget_s=args.budget_s, hbm_gbs=hbm_gbs,
                   hbm_source=hbm_source, python=platform.python_version(), **versions(), parts=[])
    for part in PARTS:
        if args.only and part.name not in args.only:
            continue
        left = deadline - time.monotonic()
        if left < MIN_PART_S:
            results["parts"].append(dict(name=part.name, status="skipped", reason=f"{left:.0f} s left of the budget"))
            write(results, out)
            continue
        if part.name in ("decode", "engine") and tuned.is_file():
            env["MULTILORA_TUNED_CONFIGS"] = str(tuned)  # measure with what tuning found
        record = run_part(part, ctx, min(part.cap_s, left), env)
        results["parts"].append(record)
        print(f"[gpu kit] {part.name}: {record['status']} in {record['seconds']:g} s", file=sys.stderr, flush=True)
        write(results, out)
    failed = [p["name"] for p in results["parts"] if p["status"] != "ok"]
    print(f"[gpu kit] done: {len(results['parts']) - len(failed)} of {len(results['parts'])} parts ok"
          + (f"; not ok: {', '.join(failed)}" if failed else "") + f"; see {out / 'summary.md'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
