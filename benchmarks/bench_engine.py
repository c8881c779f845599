"""Serving throughput: the continuous-batching engine vs. the same engine without adapters vs. PEFT.

The workload has the shape S-LoRA and Punica evaluate on: `--requests` requests over n adapters
(`--adapters`, one sweep row per n), each with a random prompt and output length, arriving as a
Gamma process.

  adapter popularity (`--pattern`)
      power      adapter = int(power(alpha) * n), S-LoRA's skew (small alpha: a few adapters take
                 most requests; alpha = 1 is uniform)
      distinct   request i → adapter i % n (Punica's "distinct")
      uniform    each request draws an adapter uniformly
      skewed     Zipf-like: adapter i with probability ∝ 1 / (i + 1) (Punica's "skewed")
      identical  every request uses adapter 0 (Punica's "identical")
  arrivals       gaps drawn from Gamma(shape 1/cv², mean 1/rate); `--rate inf` (or 0): all at t = 0
  lengths        prompt tokens uniform in `--prompt-len LO HI`, new tokens uniform in `--output-len LO HI`

Three contestants serve the same workload in one process, on copies of one tiny random Llama (CPU,
fp32). Decoding is greedy with `ignore_eos`, so every request produces exactly its max_new_tokens.

  engine      `multilora_plugin.wrap(max_loras=--max-loras)`, or `wrap(lora_memory=--lora-memory)` (a byte
              budget: as many adapters resident as fit, each at its own size), with all n adapters registered
              (lazily: weights are read from disk when first needed, inside the timed run), driven
              by `Engine`: the arrivals are replayed (requests whose arrival time has passed are
              added, then one `step()`; when idle, sleep until the next arrival)
  no-adapter  the same engine and workload, every request on the base model (no adapters registered)
  peft        Punica's baseline: a `PeftModel` holding the workload's adapters; requests are grouped
              by adapter and each group, after `set_adapter`, is generated with `model.generate` in
              left-padded batches of up to `--max-num-seqs` (max_new_tokens: the batch's largest).
              Offline: arrival times are ignored, every request is available at t = 0. Loading the
              adapters is not timed (reported apart). Run only for n <= --peft-max-adapters.

Each round builds fresh engines (cold adapter caches) and runs the three contestants one after the
other; `--repeats` rounds are interleaved and the median of each figure is reported. Throughput is
generated tokens / wall time (first arrival to last finish). Latency is finish − arrival and TTFT
first token − arrival, both from the request's scheduled arrival. The engine's tokens must equal
PEFT's for every request PEFT ran (exit code 1 otherwise, and on any failed request).

    python benchmarks/bench_engine.py                              # n = 8, 100 (a few minutes, 2 cores)
    python benchmarks/bench_engine.py --adapters 8 1000 --skip-peft
    python benchmarks/bench_engine.py --rate 20 --cv 2 --pattern skewed --plot engine.png
    python benchmarks/bench_engine.py --quick                      # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

import multilora_plugin
from multilora_plugin import Engine, toy
from multilora_plugin.sampling import SamplingParams
from multilora_plugin.scheduler import POLICIES

PATTERNS = ("power", "distinct", "uniform", "skewed", "identical")
CONTESTANTS = ("engine", "no-adapter", "peft", "cb-lora", "cb")
FIRST_TOKEN_ID = 4  # the toy vocabulary's <pad>, <unk>, <s>, </s> come first


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, nargs="+", default=[8, 100], help="adapter counts n to sweep")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--pattern", choices=PATTERNS, default="power")
    p.add_argument("--alpha", type=float, default=0.3, help="power pattern's exponent")
    p.add_argument("--rate", type=float, default=math.inf, help="requests per second (inf or 0: all at t = 0)")
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the arrival gaps")
    p.add_argument("--base-fraction", type=float, default=0.0, help="share of requests on the base model")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[8, 32], metavar=("LO", "HI"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 32], metavar=("LO", "HI"))
    p.add_argument("--max-loras", type=int, default=None,
                   help="adapters resident at most (default: 8, or unbounded with --lora-memory)")
    p.add_argument("--lora-memory", default=None, metavar="BYTES|NxR",
                   help="slot memory: a size (2GiB) or NxR, the bytes of N adapters of rank R on every linear layer "
                        "of this model (8x64: as much as 8 padded rank-64 slots)")
    p.add_argument("--max-cpu-loras", type=int, default=None, help="default: the wrapped model's (4 * max_loras)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--policy", choices=POLICIES, default="adapter_affinity")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank on all linear layers (alpha: twice the rank)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--engines", type=lambda v: v.split(","), default=["ours"], metavar="ours[,transformers]",
                   help="ours: this package's Engine with and without adapters (always); transformers: also "
                        "transformers' own continuous batching (its manager, paged KV cache) without adapters, and "
                        "with the adapters through transformers_cb")
    p.add_argument("--cb-batch-tokens", type=int, default=512, help="transformers CB: tokens per forward")
    p.add_argument("--preload", action="store_true",
                   help="read the adapters the workload uses into CPU memory before each timed run (S-LoRA's "
                        "setting: every adapter in main memory); default: lazily, inside the timed run")
    p.add_argument("--skip-peft", action="store_true", help="never run the PEFT baseline")
    p.add_argument("--peft-max-adapters", type=int, default=200,
                   help="run the PEFT baseline only for n up to this (loading many adapters into PEFT is slow)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PATH", help="write a PNG of throughput and mean latency against n")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.requests, args.repeats = [4], 16, 1
        args.prompt_len, args.output_len = [4, 12], [4, 8]
        args.hidden, args.layers, args.vocab, args.rank, args.max_loras = 64, 2, 128, 4, 2
    if args.max_loras is None and args.lora_memory is None:
        args.max_loras = 8
    for name in ("requests", "max_loras", "max_num_seqs", "rank", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} should be at least 1")
    if min(args.adapters) < 1:
        p.error("--adapters should be at least 1")
    for name in ("prompt_len", "output_len"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            p.error(f"--{name.replace('_', '-')} should be 1 <= LO <= HI, but got {lo} {hi}")
    if not set(args.engines) <= {"ours", "transformers"} or "ours" not in args.engines:
        p.error(f"--engines should be ours or ours,transformers, but got {','.join(args.engines)}")
    if "transformers" in args.engines and not (args.rate == 0 or math.isinf(args.rate)):
        p.error("--engines transformers runs offline (every request at t = 0): use --rate inf")
    if args.rate < 0 or args.cv < 0 or not 0 <= args.base_fraction <= 1:
        p.error("--rate and --cv should be >= 0 and --base-fraction in [0, 1]")
    if args.pattern == "power" and not args.alpha > 0:
        p.error("--alpha should be > 0")
    return args


# workload ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    arrival_s: float  # seconds after the start of the run
    adapter: Optional[str]  # None: the base model
    prompt_ids: Tuple[int, ...]
    max_new_tokens: int


def adapter_name(i: int) -> str:
    return f"lora{i:04d}"


def adapter_indices(rng: np.random.Generator, num_requests: int, n: int, pattern: str, alpha: float) -> np.ndarray:
    """Which of the n adapters each request uses, by popularity pattern."""
    if pattern == "power":
        return np.minimum((rng.power(alpha, num_requests) * n).astype(int), n - 1)
    if pattern == "distinct":
        return np.arange(num_requests) % n
    if pattern == "uniform":
        return rng.integers(0, n, num_requests)
    if pattern == "skewed":
        weights = 1.0 / np.arange(1, n + 1)
        return rng.choice(n, size=num_requests, p=weights / weights.sum())
    if pattern == "identical":
        return np.zeros(num_requests, dtype=int)
    raise ValueError(f"`pattern` should be one of {PATTERNS}, but got {pattern!r}")


def arrival_times(rng: np.random.Generator, num_requests: int, rate: float, cv: float) -> np.ndarray:
    """Arrival times (s) of a Gamma process: gaps of mean 1/rate and coefficient of variation cv."""
    if rate == 0 or math.isinf(rate):
        return np.zeros(num_requests)
    if cv == 0:
        gaps = np.full(num_requests, 1.0 / rate)
    else:
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), num_requests)
    return np.cumsum(gaps) - gaps[0]  # the first request arrives at t = 0


def make_workload(num_requests: int, num_adapters: int, alpha: float, pattern: str, cv: float, rate: float,
                  prompt_len: Sequence[int] = (8, 32), output_len: Sequence[int] = (16, 32), seed: int = 0,
                  vocab_size: int = 2048, base_fraction: float = 0.0) -> List[TraceRequest]:
    """`num_requests` requests in arrival order, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    adapters = adapter_indices(rng, num_requests, num_adapters, pattern, alpha)
    on_base = rng.random(num_requests) < base_fraction
    arrivals = arrival_times(rng, num_requests, rate, cv)
    prompt_lens = rng.integers(prompt_len[0], prompt_len[1] + 1, num_requests)
    output_lens = rng.integers(output_len[0], output_len[1] + 1, num_requests)
    return [
        TraceRequest(
            request_id=f"req{i:05d}", arrival_s=float(arrivals[i]),
            adapter=None if on_base[i] else adapter_name(int(adapters[i])),
            prompt_ids=tuple(int(t) for t in rng.integers(FIRST_TOKEN_ID, vocab_size, int(prompt_lens[i]))),
            max_new_tokens=int(output_lens[i]),
        )
        for i in range(num_requests)
    ]


def without_adapters(workload: List[TraceRequest]) -> List[TraceRequest]:
    return [TraceRequest(r.request_id, r.arrival_s, None, r.prompt_ids, r.max_new_tokens) for r in workload]


# model and adapters -----------------------------------------------------------------------------------
def build_base(args) -> torch.nn.Module:
    return toy.tiny_model("llama", seed=args.seed, hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=args.heads, intermediate_size=args.hidden * 43 // 16, vocab_size=args.vocab,
                          max_positions=max(512, args.prompt_len[1] + args.output_len[1]))


def write_adapters(base, root: str, count: int, args, chunk: int = 50) -> Dict[str, str]:
    """{name: directory} of `count` random rank-`args.rank` adapters on all linear layers."""
    names = [adapter_name(i) for i in range(count)]
    paths: Dict[str, str] = {}
    with tqdm(total=count, desc="writing adapters", unit="adapter", disable=not args.progress) as bar:
        for start in range(0, count, chunk):
            part = names[start:start + chunk]
            paths.update(toy.make_adapters(base, root, part, r=args.rank, lora_alpha=2 * args.rank,
                                           seed=args.seed + 1 + start // chunk))
            bar.update(len(part))
    return paths


def rank_bytes(base) -> int:
    """Bytes one rank of an adapter on every linear layer takes (fp32 A and B)."""
    return 4 * sum(m.in_features + m.out_features for name, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and name != "lm_head")


def slot_memory(spec: Optional[str], base) -> Optional[int]:
    """--lora-memory in bytes: a size, or NxR (N adapters of rank R on every linear layer)."""
    if spec is None:
        return None
    count, sep, rank = spec.partition("x")
    if sep and count.isdigit() and rank.isdigit():
        return int(count) * int(rank) * rank_bytes(base)
    from multilora_plugin.config import parse_bytes

    return parse_bytes(spec, "--lora-memory")


def resident_bound(args, base) -> int:
    """How many adapters of rank --rank can be in slots at once."""
    fit = math.inf if args.lora_bytes is None else args.lora_bytes // (args.rank * rank_bytes(base))
    return int(min(fit, args.max_loras or math.inf))


def engine_model(base, paths: Dict[str, str], args, preload: Sequence[str] = ()):
    """The wrapped model with `paths` registered; the adapters in `preload` are read into CPU memory
    first (untimed), as S-LoRA keeps every adapter in main memory."""
    model = multilora_plugin.wrap(copy.deepcopy(base), lora_memory=getattr(args, "lora_bytes", None),
                                  max_loras=args.max_loras, max_lora_rank=args.rank, max_cpu_loras=args.max_cpu_loras)
    for name, path in paths.items():
        model.register_adapter(name, path)
    for future in model.prefetch(list(preload)).values():
        future.result()
    return model


def peft_model(base, paths: Dict[str, str]):
    """A PeftModel holding every adapter in `paths`; returns (model, seconds spent loading)."""
    from peft import PeftModel

    start = time.perf_counter()
    (first, first_path), *rest = paths.items()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        model = PeftModel.from_pretrained(copy.deepcopy(base), first_path, adapter_name=first)
        for name, path in rest:
            model.load_adapter(path, adapter_name=name)
    return model.eval(), time.perf_counter() - start


# contestants ------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    seconds: float
    tokens: Dict[str, List[int]]  # request id → generated token ids
    latency_s: List[float]
    ttft_s: List[float] = field(default_factory=list)  # empty where not measured
    stats: Optional[dict] = None  # the engine's EngineStats
    errors: List[str] = field(default_factory=list)


def run_engine(model, workload: List[TraceRequest], args, desc: str) -> RunResult:
    """Replay `workload`'s arrivals into a fresh `Engine` until every request finished."""
    engine = Engine(model, max_num_seqs=args.max_num_seqs, policy=args.policy)
    params: Dict[int, SamplingParams] = {}
    queue = deque(sorted(workload, key=lambda r: r.arrival_s))
    by_id = {r.request_id: r for r in workload}
    tokens, latency, ttft, errors = {}, [], [], []
    with tqdm(total=len(workload), desc=desc, unit="req", leave=False, disable=not args.progress) as bar:
        start = time.perf_counter()
        while len(tokens) < len(workload):
            now = time.perf_counter() - start
            while queue and queue[0].arrival_s <= now:
                r = queue.popleft()
                if r.max_new_tokens not in params:
                    params[r.max_new_tokens] = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=0,
                                                              ignore_eos=True)
                engine.add_request(r.request_id, prompt_token_ids=list(r.prompt_ids),
                                   sampling_params=params[r.max_new_tokens], lora_request=r.adapter)
            if not engine.has_unfinished_requests():
                if not queue:
                    raise RuntimeError(f"the engine went idle with {len(workload) - len(tokens)} requests unanswered")
                time.sleep(max(0.0, queue[0].arrival_s - now))
                continue
            for out in engine.step():
                if not out.finished:
                    continue
                r, m = by_id[out.request_id], out.metrics
                tokens[r.request_id] = list(out.outputs[0].token_ids)
                if out.outputs[0].finish_reason != "length":
                    errors.append(f"{r.request_id}: finish_reason {out.outputs[0].finish_reason!r} ({out.error!r})")
                arrival = start + r.arrival_s
                latency.append(m.finished_time - arrival)
                if m.first_token_time is not None:
                    ttft.append(m.first_token_time - arrival)
                bar.update(1)
        seconds = time.perf_counter() - start
    stats = engine.stats().as_dict()
    stats["disk_loads"] = model.adapter_cache.stats().loads  # prefetches included
    model.adapter_cache.close()
    return RunResult(seconds, tokens, latency, ttft, stats, errors)


def run_transformers(model, workload: List[TraceRequest], args, desc: str, lora: bool) -> RunResult:
    """transformers' continuous batching (its manager and paged KV cache), every request added at
    t = 0 with its own max_new_tokens; `lora`: the wrapped model through transformers_cb,
    each request with its adapter; else a plain copy of the base model and no adapters."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in workload)
    page = 16
    config = ContinuousBatchingConfig(
        page_size=page, max_batch_tokens=args.cb_batch_tokens, max_requests_per_batch=args.max_num_seqs,
        num_blocks=args.max_num_seqs * -(-longest // page) + 8, use_cuda_graph=False, use_async_batching=False,
        allow_block_sharing=False)
    generation = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0,
                                  max_new_tokens=max(r.max_new_tokens for r in workload))
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
    tokens, latency, errors = {}, [], []
    manager.start()
    try:
        with tqdm(total=len(workload), desc=desc, unit="req", leave=False, disable=not args.progress) as bar:
            start = time.perf_counter()
            for r in workload:
                extra = {"adapter_name": r.adapter} if lora else {}
                manager.add_request(list(r.prompt_ids), request_id=r.request_id, max_new_tokens=r.max_new_tokens,
                                    **extra)
            while len(tokens) < len(workload):
                result = manager.get_result(timeout=60)
                if result is None:
                    raise RuntimeError(f"{desc}: no result for 60 s with {len(workload) - len(tokens)} unanswered")
                if not result.is_finished():
                    continue
                tokens[result.request_id] = list(result.generated_tokens)
                latency.append(time.perf_counter() - start)
                if result.error is not None:
                    errors.append(f"{result.request_id}: {result.error}")
                bar.update(1)
            seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()
    stats = None
    if lora:
        cache = model.adapter_cache.stats()
        stats = dict(adapter_swaps=cache.gpu_evictions, slot_swaps=cache.slot_swaps, gpu_misses=cache.gpu_misses,
                     cpu_misses=cache.cpu_misses, disk_loads=cache.loads, preemptions=math.nan, steps=math.nan,
                     generated_tokens=sum(len(t) for t in tokens.values()))
        model.adapter_cache.close()
    return RunResult(seconds, tokens, latency, [], stats, errors)


def left_pad(prompts: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def adapter_groups(workload: List[TraceRequest]) -> List[Tuple[Optional[str], List[TraceRequest]]]:
    """Requests grouped by adapter (by name, base-model requests last), each group in arrival order."""
    groups: Dict[Optional[str], List[TraceRequest]] = {}
    for r in workload:
        groups.setdefault(r.adapter, []).append(r)
    return sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))


def run_peft(model, workload: List[TraceRequest], args, desc: str) -> RunResult:
    """One adapter at a time: `set_adapter`, then `generate` its requests in batches (offline, t = 0)."""
    tokens, latency, errors = {}, [], []
    with tqdm(total=len(workload), desc=desc, unit="req", leave=False, disable=not args.progress) as bar, \
            torch.inference_mode():
        start = time.perf_counter()
        for adapter, group in adapter_groups(workload):
            if adapter is None:
                context = model.disable_adapter()
            else:
                model.set_adapter(adapter)
                context = contextlib.nullcontext()
            with context:
                for i in range(0, len(group), args.max_num_seqs):
                    batch = group[i:i + args.max_num_seqs]
                    ids, mask = left_pad([r.prompt_ids for r in batch])
                    new = max(r.max_new_tokens for r in batch)
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                         pad_token_id=0, eos_token_id=None)
                    finished = time.perf_counter() - start
                    if out.shape[1] != ids.shape[1] + new:
                        errors.append(f"peft generated {out.shape[1] - ids.shape[1]} tokens, expected {new}")
                    for row, r in enumerate(batch):
                        tokens[r.request_id] = out[row, ids.shape[1]:ids.shape[1] + r.max_new_tokens].tolist()
                        latency.append(finished)
                    bar.update(len(batch))
        seconds = time.perf_counter() - start
    return RunResult(seconds, tokens, latency, errors=errors)


def contestants(base, paths: Dict[str, str], peft, args,
                preload: Sequence[str] = ()) -> Dict[str, Callable[..., RunResult]]:
    """{name: (workload, args) -> RunResult}; the engines build a fresh wrapped model per call (untimed)."""
    runs = {
        "engine": lambda workload, a: run_engine(engine_model(base, paths, a, preload), workload, a, "engine"),
        "no-adapter": lambda workload, a: run_engine(engine_model(base, {}, a), without_adapters(workload), a,
                                                     "no-adapter"),
    }
    if "transformers" in args.engines:
        runs["cb-lora"] = lambda workload, a: run_transformers(engine_model(base, paths, a), workload, a, "cb-lora",
                                                               lora=True)
        runs["cb"] = lambda workload, a: run_transformers(copy.deepcopy(base), without_adapters(workload), a, "cb",
                                                          lora=False)
    if peft is not None:
        runs["peft"] = lambda workload, a: run_peft(peft, workload, a, "peft")
    return runs


def warm_up(runs: Dict[str, Callable], workload: List[TraceRequest], args) -> None:
    """Run each contestant once on a few short requests, so first-call costs stay out of the rounds."""
    short = [TraceRequest(r.request_id, 0.0, r.adapter, r.prompt_ids, min(2, r.max_new_tokens)) for r in workload[:4]]
    quiet = argparse.Namespace(**{**vars(args), "progress": False})
    for fn in runs.values():
        fn(short, quiet)


def interleaved(runs: Dict[str, Callable], workload: List[TraceRequest], args) -> Dict[str, List[RunResult]]:
    """`args.repeats` rounds, each running every contestant once."""
    results: Dict[str, List[RunResult]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            results[name].append(fn(workload, args))
    return results


# figures ----------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def summarize(rounds: List[RunResult], workload: List[TraceRequest]) -> dict:
    """The median over rounds of each figure."""
    tokens = sum(r.max_new_tokens for r in workload)

    def median(fn) -> float:
        return statistics.median(fn(run) for run in rounds)

    summary = dict(
        seconds=median(lambda run: run.seconds),
        tokens_per_s=median(lambda run: tokens / run.seconds),
        mean_latency_s=median(lambda run: statistics.fmean(run.latency_s)),
        p99_latency_s=median(lambda run: percentile(run.latency_s, 99)),
        mean_ttft_s=median(lambda run: statistics.fmean(run.ttft_s) if run.ttft_s else math.nan),
        p99_ttft_s=median(lambda run: percentile(run.ttft_s, 99)),
        generated_tokens=tokens, errors=sorted({e for run in rounds for e in run.errors}),
    )
    if rounds[0].stats is not None:
        for key in ("adapter_swaps", "slot_swaps", "gpu_misses", "cpu_misses", "disk_loads", "preemptions", "steps"):
            summary[key] = median(lambda run: run.stats[key])
        summary["engine_generated_tokens"] = median(lambda run: run.stats["generated_tokens"])
        summary["ms_per_step"] = median(lambda run: 1000 * run.seconds / max(run.stats["steps"], 1))
    return summary


def check_lengths(run: RunResult, workload: List[TraceRequest]) -> None:
    """Every request should have produced exactly its max_new_tokens (greedy, ignore_eos)."""
    wrong = [r.request_id for r in workload if len(run.tokens.get(r.request_id, ())) != r.max_new_tokens]
    if wrong:
        run.errors.append(f"{len(wrong)} requests without exactly max_new_tokens tokens, e.g. {wrong[0]}")


def mismatches(ours: RunResult, reference: RunResult) -> List[str]:
    """Request ids whose tokens differ, over the requests the reference ran."""
    return [rid for rid, ids in reference.tokens.items() if ours.tokens.get(rid) != ids]


def sweep_point(base, paths: Dict[str, str], n: int, args) -> dict:
    """Everything measured for one adapter count n."""
    workload = make_workload(args.requests, n, args.alpha, args.pattern, args.cv, args.rate,
                             tuple(args.prompt_len), tuple(args.output_len), args.seed, args.vocab,
                             args.base_fraction)
    used = sorted({r.adapter for r in workload if r.adapter is not None})
    point = dict(n=n, distinct_adapters=len(used), requests=len(workload))
    peft, point["peft_skipped"] = None, peft_skip_reason(n, args)
    if point["peft_skipped"] is None and used:
        peft, point["peft_load_s"] = peft_model(base, {name: paths[name] for name in used})
    runs = contestants(base, {name: paths[name] for name in map(adapter_name, range(n))}, peft, args,
                       used if args.preload else ())
    warm_up(runs, workload, args)
    results = interleaved(runs, workload, args)
    for run in (run for rounds in results.values() for run in rounds):
        check_lengths(run, workload)
    point["contestants"] = {name: summarize(rounds, workload) for name, rounds in results.items()}
    # ratios of runs from the same round (neighbours in time share the machine's noise), then the median
    for other in ("no-adapter", "peft"):
        if other in results:
            point[f"engine_vs_{other}"] = statistics.median(
                theirs.seconds / ours.seconds for ours, theirs in zip(results["engine"], results[other]))
    offline = args.rate == 0 or math.isinf(args.rate)
    point["slot_bound_steps"] = slot_time_bound(workload, args.resident) if offline else None
    if "peft" in results:
        bad = mismatches(results["engine"][0], results["peft"][0])
        point["mismatches"], point["mismatched_ids"] = len(bad), bad[:10]
    if "cb" in results:
        for ours, theirs in (("cb-lora", "cb"), ("engine", "cb-lora"), ("no-adapter", "cb")):
            point[f"{ours}_vs_{theirs}"] = statistics.median(
                b.seconds / a.seconds for a, b in zip(results[ours], results[theirs]))
        point["cb_mismatches"] = len(mismatches(results["cb-lora"][0], results["engine"][0]))
        point["cb_base_mismatches"] = len(mismatches(results["cb"][0], results["no-adapter"][0]))
    return point


def slot_time_bound(workload: List[TraceRequest], max_loras: int) -> float:
    """Fewest engine steps any schedule can take when every request arrives at once: each adapter
    holds a slot at least as long as its longest request runs, and only `max_loras` (the adapters
    that fit at once) are held at a time, so steps >= sum over adapters of (longest max_new_tokens) /
    max_loras."""
    longest: Dict[str, int] = {}
    for r in workload:
        if r.adapter is not None:
            longest[r.adapter] = max(longest.get(r.adapter, 0), r.max_new_tokens)
    return sum(longest.values()) / max_loras


def peft_skip_reason(n: int, args) -> Optional[str]:
    if args.skip_peft:
        return "--skip-peft"
    if n > args.peft_max_adapters:
        return f"n > --peft-max-adapters {args.peft_max_adapters}"
    return None


# report -----------------------------------------------------------------------------------------------
def fmt(value: Optional[float], spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def report(points: List[dict], args, command: str, setup_s: float) -> str:
    rate = "inf (all at t = 0)" if args.rate == 0 or math.isinf(args.rate) else f"{args.rate:g}/s, cv {args.cv:g}"
    lines = [
        f"command: `{command}`", "",
        f"Workload: {args.requests} requests, pattern {args.pattern}"
        + (f" (alpha {args.alpha:g})" if args.pattern == "power" else "")
        + f", arrivals {rate}, prompt {args.prompt_len[0]}–{args.prompt_len[1]} tokens, "
          f"output {args.output_len[0]}–{args.output_len[1]} tokens, base-model share {args.base_fraction:g}, "
          f"seed {args.seed}",
        f"Model: tiny random Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"vocab {args.vocab}, fp32, CPU; adapters rank {args.rank} (alpha {2 * args.rank}) on all linear layers",
        f"Engine: lora_memory {args.lora_memory or 'default'}"
        + (f" ({args.lora_bytes / 2 ** 20:.1f} MiB)" if args.lora_bytes else "")
        + f", max_loras {args.max_loras or 'unbounded'} (adapters resident at most: {args.resident}), "
          f"max_cpu_loras {args.max_cpu_loras or 'default'}, "
        f"max_num_seqs {args.max_num_seqs}, policy {args.policy}; greedy, ignore_eos; fresh engine per round, "
        + ("the adapters used read into CPU memory before each run (--preload)" if args.preload else
           "adapters registered lazily (disk reads are inside the timed run)"),
        "PEFT baseline: offline (arrival times ignored, all requests available at t = 0), one adapter group at a "
        "time, batches of up to max_num_seqs; adapter loading is not timed (column 'peft load s')",
        f"Median of {args.repeats} interleaved round(s); torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; setup (model + adapter writing) {setup_s:.1f} s",
        "", "| n | adapters used | engine tok/s | no-adapter tok/s | peft tok/s | engine / peft | "
            "engine / no-adapter | tokens ≠ peft | peft load s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        c = p["contestants"]
        tps = {name: c[name]["tokens_per_s"] if name in c else None for name in CONTESTANTS}
        vs_peft = p.get("engine_vs_peft")
        lines.append(
            f"| {p['n']} | {p['distinct_adapters']} | {fmt(tps['engine'], '.1f')} | {fmt(tps['no-adapter'], '.1f')} | "
            f"{fmt(tps['peft'], '.1f') if tps['peft'] else 'skipped'} | "
            f"{fmt(vs_peft, '.2f') + '×' if vs_peft else '—'} | {p['engine_vs_no-adapter']:.2f}× | "
            f"{p.get('mismatches', '—')} | {fmt(p.get('peft_load_s'), '.2f')} |"
        )
    if "cb" in points[0]["contestants"]:
        lines += ["", "transformers' continuous batching (its manager and paged KV cache; max_batch_tokens "
                      f"{args.cb_batch_tokens}, max_requests_per_batch {args.max_num_seqs}, 16-token pages) without "
                      "adapters (cb), and with the adapters through transformers_cb (cb-lora):", "",
                  "| n | cb-lora tok/s | cb tok/s | cb-lora / cb | engine tok/s | no-adapter tok/s | engine / cb-lora | "
                  "no-adapter / cb | tokens cb-lora ≠ engine | tokens cb ≠ no-adapter |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in points:
            c = p["contestants"]
            lines.append(
                f"| {p['n']} | {c['cb-lora']['tokens_per_s']:.1f} | {c['cb']['tokens_per_s']:.1f} | "
                f"{p['cb-lora_vs_cb']:.2f}× | {c['engine']['tokens_per_s']:.1f} | {c['no-adapter']['tokens_per_s']:.1f} | "
                f"{p['engine_vs_cb-lora']:.2f}× | {p['no-adapter_vs_cb']:.2f}× | {p['cb_mismatches']} | "
                f"{p['cb_base_mismatches']} |")
    lines += ["", "Ratios: the median over rounds of the ratio within a round. Engine steps against the fewest "
                  "possible when all requests arrive at once with that many adapters resident (sum over adapters of "
                  "their longest output / adapters resident at most; the no-adapter engine's steps bound it too):", "",
              "| n | engine steps | no-adapter steps | slot-time bound | engine steps / bound | "
              "engine ms / step | no-adapter ms / step |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        c = p["contestants"]
        per_step = f"| {fmt(c['engine'].get('ms_per_step'), '.2f')} | {fmt(c['no-adapter'].get('ms_per_step'), '.2f')} |"
        if p["slot_bound_steps"] is None:
            lines.append(f"| {p['n']} | {fmt(c['engine'].get('steps'), '.0f')} | "
                         f"{fmt(c['no-adapter'].get('steps'), '.0f')} | — (requests arrive over time) | — " + per_step)
            continue
        bound = max(p["slot_bound_steps"], c["no-adapter"].get("steps") or 0)
        lines.append(f"| {p['n']} | {fmt(c['engine'].get('steps'), '.0f')} | {fmt(c['no-adapter'].get('steps'), '.0f')} "
                     f"| {bound:.0f} | {c['engine']['steps'] / bound:.2f} " + per_step)
    lines += ["", "| n | contestant | seconds | tok/s | mean latency s | p99 latency s | mean TTFT s | p99 TTFT s | "
                  "adapter swaps | slot swaps | slot misses | not in CPU | disk reads | preemptions |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        for name, s in p["contestants"].items():
            counts = [fmt(s.get(k), ".0f") for k in ("adapter_swaps", "slot_swaps", "gpu_misses", "cpu_misses",
                                                      "disk_loads", "preemptions")]
            lines.append(
                f"| {p['n']} | {name} | {s['seconds']:.2f} | {s['tokens_per_s']:.1f} | {fmt(s['mean_latency_s'])} | "
                f"{fmt(s['p99_latency_s'])} | {fmt(s['mean_ttft_s'])} | {fmt(s['p99_ttft_s'])} | "
                + " | ".join(counts) + " |"
            )
    lines += ["", "adapter swaps: an adapter pushed out of its slot; slot swaps: slot buffers rewritten; "
                  "slot misses: cache lookups not answered from a slot; not in CPU: of those, not yet read from "
                  "disk when needed; disk reads: adapter reads from disk, prefetches included", ""]
    for p in points:
        if p["peft_skipped"]:
            lines.append(f"n={p['n']}: PEFT baseline skipped ({p['peft_skipped']}); tokens not checked")
        elif "mismatches" in p:
            verdict = "identical" if p["mismatches"] == 0 else f"{p['mismatches']} MISMATCHED, e.g. {p['mismatched_ids']}"
            lines.append(f"n={p['n']}: engine tokens vs PEFT over {p['requests']} requests: {verdict}")
        for name, s in p["contestants"].items():
            for error in s["errors"]:
                lines.append(f"n={p['n']}: {name} ERROR: {error}")
    return "\n".join(lines)


def plot(points: List[dict], path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot: matplotlib is not installed (pip install matplotlib); {path} not written"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in CONTESTANTS:
        xs = [p["n"] for p in points if name in p["contestants"]]
        if not xs:
            continue
        rows = [p["contestants"][name] for p in points if name in p["contestants"]]
        left.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=name)
        right.plot(xs, [r["mean_latency_s"] for r in rows], marker="o", label=name)
    for ax, label in ((left, "throughput (tokens/s)"), (right, "mean latency (s)")):
        ax.set_xscale("log")
        ax.set_xlabel("adapters (n)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("peft: offline (every request available at t = 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_engine.py"] + (sys.argv[1:] if argv is None else list(argv)))
    print(f"command: `{command}`", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    points = []
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as root:
        start = time.perf_counter()
        base = build_base(args)
        args.lora_bytes = slot_memory(args.lora_memory, base)
        args.resident = resident_bound(args, base)
        paths = write_adapters(base, root, max(args.adapters), args)
        setup_s = time.perf_counter() - start
        for n in args.adapters:
            points.append(sweep_point(base, paths, n, args))
    text = report(points, args, command, setup_s)
    print(text.split("\n", 2)[2])  # the command line is printed already
    if args.plot:
        print(plot(points, args.plot))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), command=command, torch=torch.__version__,
                           threads=torch.get_num_threads(), points=points), f, indent=2, default=str)
    failed = any(p.get("mismatches") for p in points) or any(
        s["errors"] for p in points for s in p["contestants"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
