"""Adapter cache: hit rates under skewed popularity, slot swap time vs. PEFT, disk read speed.

Four measurements, each printed as a Markdown table (paste into RESULTS.md):

  hit rates     `--requests` requests, adapter = int(power(alpha) * n) as in S-LoRA's traces, for
                n in --adapter-counts and alpha in --alphas, each served alone (acquire, forward-free
                release) by an `AdapterCache` with `--max-loras` slots and `--max-cpu-loras` CPU
                entries. The reader returns in-memory weights: the policy is what is measured.
  slot swap     a CPU-resident adapter into a slot (`acquire` + `sync`, the work done before a forward
                that needs it) against PEFT's `load_adapter` + `set_adapter` of the same adapter
                directory on the same model, interleaved. PEFT reads from disk each time, so our
                disk → slot time (`register` + `acquire` + `sync` from COLD) is shown too.
  disk → CPU    `read_adapter` (PEFT's weight loading + validation + scaling) time per MB.
  registration  `register_adapter` for `--register` adapter directories (config only).

    python benchmarks/bench_cache.py                      # the full run (~1 min on 2 cores)
    python benchmarks/bench_cache.py --quick              # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from typing import Dict, List

import numpy as np
import torch
from peft import LoraConfig

import multilora_plugin
from multilora_plugin import toy
from multilora_plugin.adapters import AdapterCache, AdapterSource, AdapterWeights, ModuleWeights, read_adapter

MB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--adapter-counts", type=int, nargs="+", default=[8, 100, 1000])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 0.6, 1.0])
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--max-cpu-loras", type=int, default=None, help="default max(4 * max_loras, 8)")
    p.add_argument("--hidden", type=int, default=1024, help="model width for the timed parts")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--swaps", type=int, default=20, help="timed slot swaps per contestant")
    p.add_argument("--register", type=int, default=1000, help="adapter directories to register")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.max_cpu_loras is None:
        args.max_cpu_loras = max(4 * args.max_loras, 8)
    if args.quick:
        args.requests, args.adapter_counts, args.alphas = 200, [8, 100], [0.1, 1.0]
        args.hidden, args.layers, args.swaps, args.register = 256, 2, 4, 50
    return args


# hit rates --------------------------------------------------------------------------------------------
def popularity_trace(n: int, alpha: float, requests: int, seed: int) -> List[int]:
    """S-LoRA's skew: small alpha sends most requests to the first adapters; alpha = 1 is uniform."""
    draws = np.random.default_rng(seed).power(alpha, requests)
    return np.minimum((draws * n).astype(int), n - 1).tolist()


def hit_rates(args) -> List[dict]:
    config = LoraConfig(r=8)
    tiny = torch.zeros(1)
    rows = []
    for n in args.adapter_counts:
        for alpha in args.alphas:
            def read(source: AdapterSource) -> AdapterWeights:
                return AdapterWeights(source.name, source.path, config, {"m": ModuleWeights(tiny, tiny)})

            cache = AdapterCache(num_slots=args.max_loras, max_cpu_loras=args.max_cpu_loras,
                                 read=read, write=lambda writes: None)
            for i in range(n):
                cache.register(AdapterSource(f"a{i}", f"/adapters/a{i}", config))
            trace = popularity_trace(n, alpha, args.requests, args.seed)
            for i in trace:
                hold = cache.acquire([f"a{i}"])
                cache.sync()
                cache.release(hold)
            s = cache.stats()
            per_k = 1000 / len(trace)
            rows.append(dict(
                n=n, alpha=alpha, distinct=len(set(trace)),
                gpu_hit_rate=s.gpu_hits / len(trace),
                cpu_hit_rate=s.cpu_hits / max(s.gpu_misses, 1),
                slot_loads_per_1k=s.gpu_misses * per_k, disk_loads_per_1k=s.loads * per_k,
            ))
    return rows


# timed parts --------------------------------------------------------------------------------------------
def build(args, root: str):
    base = toy.tiny_model("llama", seed=args.seed, hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=8, intermediate_size=args.hidden * 43 // 16, vocab_size=1024)
    names = [f"adapter{i}" for i in range(2)]
    paths = toy.make_adapters(base, root, names, r=args.rank, lora_alpha=2 * args.rank, seed=args.seed)
    return base, paths


def adapter_megabytes(path: str) -> float:
    return os.path.getsize(os.path.join(path, "adapter_model.safetensors")) / MB


def slot_swaps(base, paths: Dict[str, str], args) -> dict:
    """Alternate two adapters through one slot (ours) / through PEFT's load + set (peft)."""
    from peft import PeftModel

    ours = multilora_plugin.wrap(copy.deepcopy(base), max_loras=1, max_cpu_loras=4,  # both stay in CPU
                                 max_lora_rank=args.rank)
    for name, path in paths.items():
        ours.load_adapter(name, path)
    cache = ours.adapter_cache
    names = list(paths)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        peft = PeftModel.from_pretrained(copy.deepcopy(base), paths[names[0]], adapter_name="warm")

    def ours_swap(i: int) -> float:
        name = names[i % 2]
        start = time.perf_counter()
        hold = cache.acquire([name])
        cache.sync()
        elapsed = time.perf_counter() - start
        cache.release(hold)
        return elapsed

    def ours_cold(i: int) -> float:
        name = f"cold{i}"
        start = time.perf_counter()
        ours.register_adapter(name, paths[names[i % 2]])
        hold = cache.acquire([name])
        cache.sync()
        elapsed = time.perf_counter() - start
        cache.release(hold)
        ours.unload_adapter(name)
        return elapsed

    def peft_swap(i: int) -> float:
        name = f"v{i}"
        start = time.perf_counter()
        peft.load_adapter(paths[names[i % 2]], adapter_name=name)
        peft.set_adapter(name)
        elapsed = time.perf_counter() - start
        peft.set_adapter("warm")
        peft.delete_adapter(name)  # keep PEFT's memory bounded, as a server would
        return elapsed

    contestants = {"ours: CPU → slot": ours_swap, "ours: disk → slot": ours_cold,
                   "peft: load_adapter + set_adapter": peft_swap}
    times: Dict[str, list] = {k: [] for k in contestants}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        for fn in contestants.values():  # warm-up
            fn(0), fn(1)
        loads = cache.stats().loads
        for i in range(args.swaps):  # interleaved
            for key, fn in contestants.items():
                times[key].append(fn(i))
    cold_reads = cache.stats().loads - loads
    assert cold_reads == args.swaps, f"CPU → slot swaps read from disk ({cold_reads} reads)"
    return {k: statistics.median(v) for k, v in times.items()}


def disk_reads(base, paths: Dict[str, str], args) -> dict:
    model = multilora_plugin.wrap(copy.deepcopy(base), max_lora_rank=args.rank)
    times = []
    for i in range(max(args.swaps, 4)):
        path = paths[list(paths)[i % 2]]
        start = time.perf_counter()
        read_adapter("x", path, model._modules_info)
        times.append(time.perf_counter() - start)
    mb = adapter_megabytes(paths[list(paths)[0]])
    return dict(megabytes=mb, seconds=statistics.median(times), ms_per_mb=statistics.median(times) / mb * 1e3)


def registration(args, root: str) -> dict:
    small = toy.tiny_model("llama", seed=args.seed, hidden_size=64, num_layers=2)
    names = [f"r{i:05d}" for i in range(args.register)]
    paths = toy.make_adapters(small, root, names, r=4, target_modules=["q_proj", "v_proj"], seed=args.seed)
    model = multilora_plugin.wrap(small)
    start = time.perf_counter()
    for name, path in paths.items():
        model.register_adapter(name, path)
    elapsed = time.perf_counter() - start
    return dict(adapters=len(names), seconds=elapsed, per_second=len(names) / elapsed)


# report -----------------------------------------------------------------------------------------------
def report(results: dict, args, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Hit rates: {args.requests} requests, max_loras={args.max_loras}, max_cpu_loras={args.max_cpu_loras}",
             "", "| n | alpha | distinct adapters | GPU hit rate | CPU hit rate (of GPU misses) "
             "| slot loads / 1k req | disk loads / 1k req |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["hit_rates"]:
        lines.append(f"| {r['n']} | {r['alpha']} | {r['distinct']} | {r['gpu_hit_rate']:.1%} | "
                     f"{r['cpu_hit_rate']:.1%} | {r['slot_loads_per_1k']:.0f} | {r['disk_loads_per_1k']:.0f} |")
    swaps, peft = results["slot_swap"], results["slot_swap"]["peft: load_adapter + set_adapter"]
    lines += ["", f"Slot swap: Llama hidden {args.hidden}, {args.layers} layers, rank {args.rank} on all "
              f"7 projections ({results['disk']['megabytes']:.1f} MB per adapter); median of {args.swaps}",
              "", "| contestant | ms | PEFT / this |", "|---|---:|---:|"]
    for key, seconds in swaps.items():
        lines.append(f"| {key} | {seconds * 1e3:.2f} | {peft / seconds:.1f}× |")
    d, g = results["disk"], results["registration"]
    lines += ["", f"Disk → CPU (`read_adapter`): {d['ms_per_mb']:.2f} ms per MB "
              f"({d['seconds'] * 1e3:.1f} ms for {d['megabytes']:.1f} MB)",
              f"Registration (config only): {g['adapters']} adapters in {g['seconds']:.2f} s "
              f"({g['per_second']:.0f} per second)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    results = {"hit_rates": hit_rates(args)}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as root:
        base, paths = build(args, f"{root}/big")
        results["slot_swap"] = slot_swaps(base, paths, args)
        results["disk"] = disk_reads(base, paths, args)
        results["registration"] = registration(args, f"{root}/many")
    command = "python benchmarks/bench_cache.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(report(results, args, command.strip()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
