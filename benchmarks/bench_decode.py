"""Decode throughput: base model vs. multilora_plugin vs. PEFT, side by side in one run.

Three contestants generate from the same random prompts, each on its own copy of one tiny random
Llama (CPU, fp32, greedy, no padding):

  base  the plain model, no adapters
  ours  `multilora_plugin.wrap(...)` with every adapter loaded, `generate(..., adapter_names=[...])`
  peft  `PeftModel` with every adapter loaded, `generate(..., adapter_names=[...])` (mixed batch)

Each contestant runs one warm-up generate, then `--repeats` timed rounds interleaved
(base, ours, peft, base, ours, peft, ...). Throughput is batch * new_tokens / median time.
Our tokens must equal PEFT's (exit code 1 otherwise).

Scenarios: `distinct` gives row i adapter i % adapters; `one` gives every row the same adapter.

    python benchmarks/bench_decode.py                        # the full-size default
    python benchmarks/bench_decode.py --scenario one --json out.json
    python benchmarks/bench_decode.py --hidden 128 --layers 2 --adapters 4 --batch 4 \\
        --new-tokens 4 --repeats 1                           # a quick smoke run
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
from typing import Callable, Dict, List

import torch

import multilora_plugin
from multilora_plugin import toy

CONTESTANTS = ("base", "ours", "peft")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=("distinct", "one"), default="distinct",
                   help="distinct: one adapter per row; one: every row uses the same adapter")
    p.add_argument("--adapters", type=int, default=16, help="adapters to build and load (default 16)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha is twice the rank)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default hidden * 43/16: 1376 at 512)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per contestant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.intermediate is None:
        args.intermediate = args.hidden * 43 // 16
    for name in ("adapters", "rank", "batch", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} should be at least 1")
    return args


def build_base(args) -> torch.nn.Module:
    return toy.tiny_model("llama", seed=args.seed, hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=args.heads, intermediate_size=args.intermediate, vocab_size=args.vocab)


def build_adapters(base, root: str, args) -> Dict[str, str]:
    """{name: directory} of `args.adapters` distinct random PEFT adapters on all linear projections."""
    return {
        f"a{i}": toy.make_adapter(base, os.path.join(root, f"a{i}"), r=args.rank, lora_alpha=2 * args.rank,
                                  target_modules="all-linear", seed=args.seed + 1 + i)
        for i in range(args.adapters)
    }


def row_adapters(names: List[str], args) -> List[str]:
    if args.scenario == "one":
        return [names[0]] * args.batch
    return [names[i % len(names)] for i in range(args.batch)]


def make_ours(base, paths: Dict[str, str], args):
    model = multilora_plugin.wrap(copy.deepcopy(base), max_loras=len(paths), max_lora_rank=args.rank)
    for name, path in paths.items():
        model.load_adapter(name, path)
    return model


def make_peft(base, paths: Dict[str, str]):
    from peft import PeftModel

    (first, first_path), *rest = paths.items()
    model = PeftModel.from_pretrained(copy.deepcopy(base), first_path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    return model.eval()


def make_contestants(base, paths: Dict[str, str], prompt: torch.Tensor, args) -> Dict[str, Callable]:
    """{name: () -> generated ids}, each on its own copy of `base`."""
    gen = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    rows = row_adapters(list(paths), args)
    plain, ours, peft = copy.deepcopy(base), make_ours(base, paths, args), make_peft(base, paths)
    return {
        "base": lambda: plain.generate(**gen),
        "ours": lambda: ours.generate(adapter_names=rows, **gen),
        "peft": lambda: peft.generate(adapter_names=rows, **gen),
    }


def timed(fn: Callable):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def benchmark(contestants: Dict[str, Callable], repeats: int):
    """Warm up each contestant once, then time `repeats` interleaved rounds.

    Returns ({name: [seconds, ...]}, {name: warm-up output}).
    """
    outputs = {name: fn() for name, fn in contestants.items()}
    times = {name: [] for name in contestants}
    for _ in range(repeats):
        for name, fn in contestants.items():
            seconds, _ = timed(fn)
            times[name].append(seconds)
    return times, outputs


def summarize(times: Dict[str, List[float]], args) -> dict:
    tokens = args.batch * args.new_tokens
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    return {
        "tokens_per_s": tps,
        "seconds": times,
        "ratios": {
            "ours/base": tps["ours"] / tps["base"],
            "peft/base": tps["peft"] / tps["base"],
            "ours/peft": tps["ours"] / tps["peft"],
        },
    }


def report(summary: dict, match: bool, args, command: str) -> str:
    tps, ratios = summary["tokens_per_s"], summary["ratios"]
    lines = [
        f"scenario={args.scenario} batch={args.batch} adapters={args.adapters} rank={args.rank} "
        f"prompt={args.prompt_len} new_tokens={args.new_tokens} hidden={args.hidden} layers={args.layers} "
        f"repeats={args.repeats}",
        "",
        "| contestant | tokens/s | vs base |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {tps[name]:.1f} | {tps[name] / tps['base']:.2f}x |" for name in CONTESTANTS]
    lines += [""] + [f"{key}: {value:.3f}" for key, value in ratios.items()]
    lines += [
        f"tokens match PEFT: {'yes' if match else 'no'}",
        f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        f"command: {command}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python"] + sys.argv) if argv is None else shlex.join(["python", sys.argv[0]] + argv)
    torch.manual_seed(args.seed)
    # ids 4.. avoid the toy vocabulary's <pad>, <unk>, <s> and </s>
    prompt = torch.randint(4, args.vocab, (args.batch, args.prompt_len))
    with tempfile.TemporaryDirectory() as root:
        base = build_base(args)
        paths = build_adapters(base, root, args)
        contestants = make_contestants(base, paths, prompt, args)
    with torch.inference_mode():
        times, outputs = benchmark(contestants, args.repeats)
    expected_shape = (args.batch, args.prompt_len + args.new_tokens)
    for name, out in outputs.items():
        if tuple(out.shape) != expected_shape:
            raise SystemExit(f"{name} generated shape {tuple(out.shape)}, expected {expected_shape}")
    match = torch.equal(outputs["ours"], outputs["peft"])
    summary = summarize(times, args)
    print(report(summary, match, args, command))
    if args.json:
        result = dict(config=vars(args), tokens_match_peft=match, torch=torch.__version__,
                      threads=torch.get_num_threads(), command=command, **summary)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main())
