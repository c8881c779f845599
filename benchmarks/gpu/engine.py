"""The serving workload of `bench_engine.py` on a GPU, at 1B–7B shapes: our engine with adapters, the
same engine without adapters, and transformers' own continuous batching on the same model.

Workload: `bench_engine.make_workload` (power-law adapter popularity, random prompt and output lengths,
every request arriving at t = 0), greedy, every request producing exactly its max_new_tokens.
Model: a randomly initialised Llama of the `--preset` shapes, in bf16, built on the device. Adapters:
`--adapters` real PEFT directories (rank `--rank`, all linear layers), written untimed, read lazily
inside the timed run. Contestants, each on its own copy of the base model, run one after the other:

  engine          `Engine` over `wrap(max_loras=--max-loras)` (Triton kernels on CUDA)
  no-adapter      the same engine, every request on the base model
  generate_batch  transformers' continuous batching (paged KV cache) over the base model, through
                  `continuous_batching_context_manager` and one `add_request` per request (its own
                  max_new_tokens), with transformers' own settings (flash attention and CUDA graphs
                  where available); it serves no adapters at all
  cb-lora         the adapters inside transformers' continuous batching (transformers_cb:
                  CUDA graphs and async batching off, as that integration requires)
  cb              transformers' continuous batching without adapters, with cb-lora's settings: the
                  baseline of the integration's target (cb-lora >= 0.9x cb)

Tokens/s = generated tokens / wall time. The no-adapter engine's tokens are compared with
generate_batch's (the same base model, greedy): in bf16 the two attention paths may round apart, so
this is reported, not asserted.

    python benchmarks/gpu/engine.py --preset 1b --json engine.json
    python benchmarks/gpu/engine.py --dry-run
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import pathlib
import sys
import tempfile
import time
from typing import Dict

import torch

HERE = pathlib.Path(__file__).resolve().parent


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench_engine = _load("bench_engine", HERE.parent / "bench_engine.py")
decode = _load("gpu_decode", HERE / "decode.py")

PRESETS = {  # Llama shapes: hidden, MLP, layers, heads
    "1b": (2048, 5632, 22, 32),  # TinyLlama-1.1B
    "3b": (3200, 8640, 26, 32),  # OpenLLaMA-3B
    "7b": (4096, 11008, 32, 32),  # Llama-2-7B
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--adapters", type=int, default=8, help="adapters the workload spreads over")
    p.add_argument("--alpha", type=float, default=0.3, help="power pattern's exponent")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[64, 256], metavar=("LO", "HI"))
    p.add_argument("--output-len", type=int, nargs=2, default=[32, 128], metavar=("LO", "HI"))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU")
    args = p.parse_args(argv)
    args.hidden, args.intermediate, args.layers, args.heads = PRESETS[args.preset]
    if args.dry_run:
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab = 64, 128, 2, 4, 128
        args.requests, args.adapters, args.max_loras, args.rank = 8, 3, 2, 4
        args.prompt_len, args.output_len, args.preset = [4, 8], [3, 6], "tiny (dry run)"
    # what bench_engine's helpers read
    args.max_cpu_loras, args.policy, args.progress, args.pattern = None, "adapter_affinity", False, "power"
    args.cb_batch_tokens = 64 if args.dry_run else 2048
    args.prompt_len_max = args.prompt_len[1]
    return args


def run_generate_batch(base, workload, args) -> "bench_engine.RunResult":
    """transformers' continuous batching over `workload` (all at t = 0), each request its own length."""
    from transformers import GenerationConfig

    model = copy.deepcopy(base)
    config = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in workload),
                              eos_token_id=None, pad_token_id=0)
    tokens, latency, errors = {}, [], []
    with torch.inference_mode():
        start = time.perf_counter()
        sizes = None  # transformers' own sizing on a GPU; on CPU (the dry run) it would take 60% of the memory
        if args.dry_run:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            sizes = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=64, page_size=16)
        with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=30,
                                                       continuous_batching_config=sizes) as manager:
            for r in workload:
                manager.add_request(list(r.prompt_ids), request_id=r.request_id, max_new_tokens=r.max_new_tokens)
            while len(tokens) < len(workload):
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        errors.append(f"generate_batch stopped with {len(workload) - len(tokens)} requests unanswered")
                        break
                    continue
                if result.is_finished():
                    tokens[result.request_id] = list(result.generated_tokens)
                    latency.append(time.perf_counter() - start)
                    if result.error:
                        errors.append(f"{result.request_id}: {result.error}")
        seconds = time.perf_counter() - start
    return bench_engine.RunResult(seconds, tokens, latency, errors=errors)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    started = time.perf_counter()
    shapes = argparse.Namespace(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                                heads=args.heads, vocab=args.vocab, prompt_len=args.prompt_len[1],
                                steps=args.output_len[1])
    base = decode.build_model(shapes, device)
    base.generation_config.eos_token_id = None  # random weights: every request runs to its max_new_tokens
    base.generation_config.pad_token_id = 0
    workload = bench_engine.make_workload(args.requests, args.adapters, args.alpha, "power", 1.0, 0.0,
                                          tuple(args.prompt_len), tuple(args.output_len), args.seed, args.vocab)
    generated = sum(r.max_new_tokens for r in workload)
    results: Dict[str, dict] = {}
    runs: Dict[str, "bench_engine.RunResult"] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-engine-") as root:
        paths = bench_engine.write_adapters(base, root, args.adapters, args)
        setup_s = time.perf_counter() - started
        contestants = {
            "engine": lambda w, a: bench_engine.run_engine(bench_engine.engine_model(base, paths, a), w, a, "engine"),
            "no-adapter": lambda w, a: bench_engine.run_engine(bench_engine.engine_model(base, {}, a),
                                                               bench_engine.without_adapters(w), a, "no-adapter"),
            "generate_batch": lambda w, a: run_generate_batch(base, bench_engine.without_adapters(w), a),
            "cb-lora": lambda w, a: bench_engine.run_transformers(bench_engine.engine_model(base, paths, a), w, a,
                                                                  "cb-lora", lora=True),
            "cb": lambda w, a: bench_engine.run_transformers(copy.deepcopy(base), bench_engine.without_adapters(w),
                                                             a, "cb", lora=False),
        }
        for name, run in contestants.items():
            try:
                bench_engine.warm_up({name: run}, workload, args)  # kernel compiles, graph captures: untimed
                runs[name] = run(workload, args)
                r = runs[name]
                results[name] = dict(seconds=r.seconds, tokens_per_s=generated / r.seconds, errors=r.errors[:5],
                                     requests_done=len(r.tokens))
            except Exception as exc:  # noqa: BLE001 - reported; the other contestants still run
                results[name] = dict(error=f"{type(exc).__name__}: {exc}"[:500])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "no-adapter" in runs and "generate_batch" in runs:
        same = sum(runs["no-adapter"].tokens.get(k) == v for k, v in runs["generate_batch"].tokens.items())
        results["generate_batch"]["tokens_equal_to_no_adapter"] = f"{same}/{len(workload)}"
    if "cb-lora" in runs and "cb" in runs:
        results["cb-lora"]["vs_cb"] = runs["cb"].seconds / runs["cb-lora"].seconds
    if "cb-lora" in runs and "engine" in runs:
        same = sum(runs["engine"].tokens.get(k) == v for k, v in runs["cb-lora"].tokens.items())
        results["cb-lora"]["tokens_equal_to_engine"] = f"{same}/{len(workload)}"
    text = report(results, args, device_name, generated, setup_s)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(device=device_name, args=vars(args), results=results,
                                                           report=text), indent=1, default=str))
    ok = all("error" not in r and not r.get("errors") for r in results.values())
    return 0 if ok else 1


def report(results: Dict[str, dict], args, device_name: str, generated: int, setup_s: float) -> str:
    ref = results.get("no-adapter", {}).get("tokens_per_s")
    lines = [f"Engine workload on {device_name}: Llama {args.preset} shapes (hidden {args.hidden}, {args.layers} layers), "
             f"{'bf16' if device_name != 'cpu' else 'fp32'}; {args.requests} requests over {args.adapters} rank-{args.rank} adapters (power "
             f"{args.alpha:g}), prompts {args.prompt_len[0]}–{args.prompt_len[1]}, outputs "
             f"{args.output_len[0]}–{args.output_len[1]} ({generated} tokens), all at t = 0; max_loras "
             f"{args.max_loras}, max_num_seqs {args.max_num_seqs}; setup {setup_s:.1f} s", "",
             "| contestant | seconds | tokens/s | vs no-adapter engine | notes |", "|---|---:|---:|---:|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | — | — | — | failed: {r['error'][:200]} |")
            continue
        notes = "; ".join(filter(None, [r.get("tokens_equal_to_no_adapter") and
                                        f"tokens equal to no-adapter: {r['tokens_equal_to_no_adapter']}",
                                        r.get("tokens_equal_to_engine") and
                                        f"tokens equal to engine: {r['tokens_equal_to_engine']}",
                                        r.get("vs_cb") and f"{r['vs_cb']:.2f}x cb",
                                        *r.get("errors", [])]))
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / ref:.2f}× | {notes} |" if ref else
                     f"| {name} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | — | {notes} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
