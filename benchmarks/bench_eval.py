"""Evaluate N adapters with lm-evaluation-harness: `evaluate_adapters` (one engine, every adapter's
requests mixed in batches) against N sequential lm-eval runs of its `hf` backend with `peft=PATH`
(the way people evaluate adapters today), in one process, load time included on both sides.

A tiny random Llama saved to a directory, N PEFT adapters (all-linear), and the three local json tasks
of `toy.make_eval_tasks` (multiple_choice, generate_until, loglikelihood_rolling). Both sides must agree:
every metric (perplexities to float rounding), every per-sample log-likelihood within 2e-3, every
generated text identical (exit code 1 otherwise).

    python benchmarks/bench_eval.py                       # 8 adapters, 32 documents per task
    python benchmarks/bench_eval.py --json out.json
    python benchmarks/bench_eval.py --quick               # a smoke run at tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS = ["toy_choice", "toy_generate", "toy_rolling"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--docs", type=int, default=32, help="documents per task")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-length", type=int, default=32, help="lm-eval's max_length (rolling windows)")
    p.add_argument("--hf-batch-size", type=int, default=1,
                   help="lm-eval's batch_size for the hf runs (1, its default: each request alone)")
    p.add_argument("--batch-size", type=int, default=256, help="requests running at once in our engine")
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per side (the best is reported)")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.docs, args.hidden, args.layers, args.max_loras, args.rounds = 2, 4, 64, 2, 2, 1
    return args


def build(root: str, args) -> tuple:
    from multilora_plugin import toy

    base = toy.tiny_model("llama", hidden_size=args.hidden, num_layers=args.layers)
    base.save_pretrained(os.path.join(root, "base"))
    toy.tiny_tokenizer().save_pretrained(os.path.join(root, "base"))
    names = [f"adapter{i}" for i in range(args.adapters)]
    paths = toy.make_adapters(base, os.path.join(root, "adapters"), names, r=args.rank, lora_alpha=2 * args.rank)
    return os.path.join(root, "base"), paths, toy.make_eval_tasks(os.path.join(root, "tasks"), docs=args.docs)


def disagreements(ours: dict, theirs: dict) -> list:
    """Where two lm-eval results of one adapter differ beyond what float rounding explains."""
    found = []
    for task in TASKS:
        for metric, value in theirs["results"][task].items():
            other = ours["results"][task][metric]
            if isinstance(value, float) and ("perplexity" in metric or "bits_per_byte" in metric):
                same = abs(other - value) <= 1e-5 * abs(value)
            else:
                same = other == value
            if not same:
                found.append(f"{task} {metric}: {other} != {value}")
        for mine, want in zip(ours["samples"][task], theirs["samples"][task]):
            for a, b in zip(mine["resps"], want["resps"]):
                if task == "toy_generate":
                    ok = a == b
                elif task == "toy_rolling":
                    ok = abs(a[0] - b[0]) <= 2e-3
                else:
                    ok = abs(a[0][0] - b[0][0]) <= 2e-3 and a[0][1] == b[0][1]
                if not ok:
                    found.append(f"{task} doc {mine['doc_id']}: {a} != {b}")
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval.tasks import TaskManager, get_task_dict

    from multilora_plugin.integrations.lm_eval import evaluate_adapters

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as root:
        base, paths, include = build(root, args)
        manager = TaskManager(include_path=include)
        common = dict(tasks=TASKS, task_manager=manager, log_samples=True)
        get_task_dict(TASKS, manager)  # the datasets' first load (json → arrow cache) is neither side's cost
        def run_ours() -> dict:
            model_args = dict(device="cpu", dtype="float32", max_length=args.max_length, max_loras=args.max_loras,
                              batch_size=args.batch_size)
            return evaluate_adapters(base, paths, model_args=model_args, progress=False, **common)

        def run_hf() -> dict:
            runs = {}
            for name, path in paths.items():
                model_args = (f"pretrained={base},peft={path},device=cpu,dtype=float32,max_length={args.max_length},"
                              f"batch_size={args.hf_batch_size}")
                runs[name] = lm_eval.simple_evaluate(model="hf", model_args=model_args, **common)
            return runs

        times = {"ours": [], "hf": []}
        for round_ in range(args.rounds):  # the order alternates: the first side also pays first imports
            for side in (("ours", "hf") if round_ % 2 == 0 else ("hf", "ours")):
                started = time.perf_counter()
                if side == "ours":
                    ours = run_ours()
                else:
                    theirs = run_hf()
                times[side].append(time.perf_counter() - started)
        ours_s, hf_s = min(times["ours"]), min(times["hf"])
    found = {name: disagreements(ours[name], theirs[name]) for name in paths}
    bad = {name: f for name, f in found.items() if f}
    requests = sum(len(s["resps"]) for task in TASKS for s in ours[next(iter(paths))]["samples"][task])
    result = {
        "command": "python benchmarks/bench_eval.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "adapters": args.adapters, "docs_per_task": args.docs, "lm_eval_requests_per_adapter": requests,
        "model": f"llama h{args.hidden} x {args.layers} layers, rank {args.rank}", "threads": torch.get_num_threads(),
        "rounds_s": {side: [round(t, 2) for t in ts] for side, ts in times.items()},
        "ours_s": round(ours_s, 2), "hf_peft_sequential_s": round(hf_s, 2), "speedup": round(hf_s / ours_s, 2),
        "results_equal": not bad, "disagreements": {n: f[:5] for n, f in bad.items()},
        "metrics": {name: {task: {k: v for k, v in res["results"][task].items()
                                  if isinstance(v, float) and "stderr" not in k} for task in TASKS}
                    for name, res in list(ours.items())[:2]},
    }
    print(f"{args.adapters} adapters x {len(TASKS)} tasks x {args.docs} docs ({requests} lm-eval requests each), "
          f"{result['model']}, {result['threads']} threads")
    print(f"  evaluate_adapters (one engine, mixed batches): {ours_s:8.2f} s")
    print(f"  lm-eval hf + peft, one run per adapter:       {hf_s:8.2f} s")
    print(f"  speedup {hf_s / ours_s:.2f}x; results equal: {not bad}")
    for name, f in bad.items():
        print(f"  {name}: {len(f)} disagreements, e.g. {f[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
