"""The LoRA delta op alone, on Punica's decode shapes: ours vs. the usual ways of writing it.

One decode step of one projection: every row of the batch brings one token (T = batch), and each
row adds the delta of its own adapter, `y[i] += x[i] @ A[s].T @ B[s].T`. Nothing else is timed.

Sweep (each option below restricts it):
  shapes     4096x4096 and 4096x11008 (in x out)
  ranks      8, 16, 32, 64; every slot holds an adapter of that rank. "8+64": slots alternate between
             ranks 8 and 64 (a 50/50 mix in the batch, each packed at its own rank)
  batches    1, 4, 16, 64
  patterns   which adapter each row uses:
               distinct   row i uses adapter i
               uniform    rows drawn uniformly from max(1, batch // 4) adapters
               skewed     Zipf-like: adapter k with probability ~ 1 / (k + 1) ** 1.5, over `batch` adapters
               identical  every row uses adapter 0
The slot buffers hold as many adapters as the sweep's largest case uses (64 for the default sweep).
`--slot-order packed` (default) keeps adapter k in slot k; `scattered` puts the adapters in the slots
in a fixed random order, as a long-running server's slot cache ends up: a batch's slots are then
neither sorted nor contiguous. Row choices, weights and activations come from fixed seeds.

CPU contestants (fp32):
  ours        `TorchBackend().add_lora` with a `TokenMapping` built outside the timed region, as the
              model builds it once per forward call and shares it across layers, on a `SlotBank` laid
              out as the slot memory lays it out (each adapter at its own rank, packed: the
              byte-budgeted layout; `--slot-rank` pads only the baselines' slot tensors)
  peft_loop   what PEFT's `adapter_names` does in each layer: a Python loop over the distinct adapters
              of the batch, indexing each one's rows out of x and adding its delta back into y
  gather_bmm  gather every row's whole (padded) slot weights, then two batched matmuls

GPU contestants (bf16, only when CUDA is available; meant for a GPU machine, not run in CI):
  triton      `TritonBackend().add_lora` (the BGMV kernels; the warm-up compiles them)
  ours        `TorchBackend().add_lora` on the GPU; `lora_ranks` stays on the GPU as in the model, so
              each call syncs once to read the ranks
  gather_bmm  as on CPU
`--contestants` replaces either list (the GPU kit's dry run runs `triton` on CPU, interpreted).

Timing: each contestant is warmed up, then timed in blocks of calls sized to about a tenth of
`--min-time`; the contestants' blocks are interleaved round by round until each one has run for
`--min-time` seconds or `--max-reps` calls. The median time per call is reported (CUDA events on GPU).
Achieved bandwidth = minimal bytes / time, where the minimal bytes are x (T * in), y read and
written (2 * T * out) and the weights of the distinct adapters used, cut to their rank
(adapters * r * (in + out)), all at the element size. On GPU it is also shown as a fraction of
`--hbm-gbs` (default 4800 GB/s, an H200).

Before timing, every config checks that all contestants give the same y (allclose, rtol = atol =
1e-3 in fp32, 3e-2 in bf16); the exit code is 1 if any config disagrees.

    python benchmarks/bench_kernels.py                                    # the full sweep (minutes)
    python benchmarks/bench_kernels.py --json kernels.json --plot kernels.png
    python benchmarks/bench_kernels.py --shapes 4096x4096 --ranks 16 --batches 1 16 \\
        --patterns distinct identical --min-time 0.02                     # a quick smoke run
    python benchmarks/bench_kernels.py --devices cuda --json gpu.json     # GPU contestants only

CPU timings depend on glibc's malloc: by default it may hand a freed multi-MiB buffer back to the OS
and page-fault it in again on the next call, or not, depending on what ran before in the process (a
10x swing for gather_bmm). So the script first fixes malloc's thresholds (mmap above 32 MiB, as glibc
ends up anyway; never trim the heap), which makes runs repeatable; `--default-malloc` skips that.

`--plot` needs matplotlib (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from multilora_plugin import BatchMapping
from multilora_plugin.kernels import SlotBank, TorchBackend
from multilora_plugin.mapping import TokenMapping

SHAPES = ("4096x4096", "4096x11008")
RANKS = (8, 16, 32, 64)
BATCHES = (1, 4, 16, 64)
PATTERNS = ("distinct", "uniform", "skewed", "identical")
PLOT_RANK = 16

BLOCKS = 10  # aim for about this many timed blocks per contestant
MIN_BLOCKS = 3


@dataclass(frozen=True)
class Suite:
    """The contestants of one device. The first is the one measured against the others."""

    device: str
    dtype: torch.dtype
    contestants: Tuple[str, ...]
    tol: float


CPU_SUITE = Suite("cpu", torch.float32, ("ours", "peft_loop", "gather_bmm"), 1e-3)
CUDA_SUITE = Suite("cuda", torch.bfloat16, ("triton", "ours", "gather_bmm"), 3e-2)


def parse_shape(text: str) -> Tuple[int, int]:
    try:
        d_in, d_out = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape should look like 4096x11008 (in x out), but got {text!r}")
    if d_in < 1 or d_out < 1:
        raise argparse.ArgumentTypeError(f"shape sizes should be at least 1, but got {text!r}")
    return d_in, d_out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in SHAPES],
                   metavar="INxOUT", help=f"projection shapes (default {' '.join(SHAPES)})")
    p.add_argument("--ranks", nargs="+", type=rank_mix, default=[(r,) for r in RANKS],
                   help="ranks, or mixes such as 8+64 (slots alternate between them)")
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    p.add_argument("--slot-order", choices=("packed", "scattered"), default="packed",
                   help="packed: adapter k in slot k; scattered: adapters in a fixed random order of slots")
    p.add_argument("--slot-rank", type=int, default=None,
                   help="width R of the slot buffers (a model's max_lora_rank); default: each config's rank, "
                        "so there is no padding past the rank")
    p.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), default=None,
                   help="default: cpu, plus cuda when it is available")
    p.add_argument("--contestants", nargs="+", choices=("ours", "triton", "peft_loop", "gather_bmm"), default=None,
                   help="replace each device's contestants (the first is measured against the others); 'triton' "
                        "on CPU needs TRITON_INTERPRET=1, as the GPU kit's dry run does")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timed calls per contestant (default 0.2)")
    p.add_argument("--max-reps", type=int, default=10000, help="at most this many timed calls per contestant")
    p.add_argument("--warmup", type=int, default=3, help="unreported calls per contestant first (default 3)")
    p.add_argument("--hbm-gbs", type=float, default=4800.0, help="GPU memory bandwidth in GB/s (default 4800: H200)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc thresholds alone (see above; timings then depend on history)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write every result as JSON to PATH")
    p.add_argument("--plot", metavar="PATH", help=f"save a PNG of µs vs batch at rank {PLOT_RANK} (needs matplotlib)")
    args = p.parse_args(argv)
    if min(args.batches) < 1:
        p.error("--batches should all be at least 1")  # ranks: checked by rank_mix
    largest = max(max(mix) for mix in args.ranks)
    if args.slot_rank is not None and args.slot_rank < largest:
        p.error(f"--slot-rank {args.slot_rank} is smaller than the largest rank {largest}")
    if args.min_time < 0 or args.max_reps < 1 or args.warmup < 1:
        p.error("--min-time should be at least 0, --max-reps and --warmup at least 1")
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif "cuda" in args.devices and not torch.cuda.is_available():
        p.error("--devices cuda was asked for, but CUDA is not available")
    return args


# ---------------------------------------------------------------- workload


def row_adapters(pattern: str, batch: int, seed: int) -> Tuple[int, ...]:
    """The adapter of each row; the same for every shape, rank and device."""
    gen = torch.Generator().manual_seed(seed * 1000 + batch)
    if pattern == "distinct":
        return tuple(range(batch))
    if pattern == "uniform":
        return tuple(torch.randint(0, max(1, batch // 4), (batch,), generator=gen).tolist())
    if pattern == "skewed":
        weights = 1.0 / torch.arange(1, batch + 1, dtype=torch.float64) ** 1.5  # adapter k: 1 / (k + 1) ** 1.5
        return tuple(torch.multinomial(weights, batch, replacement=True, generator=gen).tolist())
    if pattern == "identical":
        return (0,) * batch
    raise ValueError(pattern)


def slots_needed(batches: Sequence[int], patterns: Sequence[str], seed: int) -> int:
    return max(max(row_adapters(p, b, seed)) + 1 for b in batches for p in patterns)


def slot_of_adapter(num_slots: int, order: str, seed: int) -> List[int]:
    """Which slot holds adapter k: k itself (packed), or a fixed random permutation (scattered)."""
    if order == "packed":
        return list(range(num_slots))
    return torch.randperm(num_slots, generator=torch.Generator().manual_seed(seed + 3)).tolist()


def rank_mix(value: str) -> tuple:
    """"16" → (16,); "8+64" → (8, 64)."""
    try:
        ranks = tuple(int(part) for part in value.split("+"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rank or ranks joined by '+', but got {value!r}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"ranks should be at least 1, but got {value!r}")
    return ranks


def rank_label(mix: tuple):
    return mix[0] if len(mix) == 1 else "+".join(map(str, mix))


def make_weights(num_slots: int, mix: tuple, slot_rank: int, d_in: int, d_out: int, seed: int):
    """Slot buffers as the baselines keep them, slot s filled to rank mix[s % len(mix)], zeros after.

    Returns lora_a [S, R, in], lora_b [S, out, R] (scaling folded in) and lora_ranks [S] int32, fp32 on CPU.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    lora_a = torch.zeros(num_slots, slot_rank, d_in)
    lora_b = torch.zeros(num_slots, d_out, slot_rank)
    ranks = [mix[s % len(mix)] for s in range(num_slots)]
    for s, rank in enumerate(ranks):
        lora_a[s, :rank] = torch.randn(rank, d_in, generator=gen) / d_in ** 0.5
        lora_b[s, :, :rank] = torch.randn(d_out, rank, generator=gen) / rank ** 0.5
    return lora_a, lora_b, torch.tensor(ranks, dtype=torch.int32)


@dataclass
class Workload:
    """One config's inputs on one device. Contestants add the delta into a y they are given."""

    rows: Tuple[int, ...]  # [T] slot of each row (one token per row)
    x: torch.Tensor  # [T, in]
    y: torch.Tensor  # [T, out], the untouched starting value
    lora_a: torch.Tensor  # [S, R, in]
    lora_b: torch.Tensor  # [S, out, R]
    lora_ranks: torch.Tensor  # [S] int32, on the device like the model's buffer
    tokens: TokenMapping  # built once, outside the timed region
    bank: SlotBank  # the same pairs as the slot memory holds them: each at its own rank, packed

    @property
    def adapters_used(self) -> int:
        return len(set(self.rows))


def minimal_bytes(batch: int, d_in: int, d_out: int, adapters: int, rank: float, elem: int) -> int:
    """x read, y read and written, and each used adapter's weights cut to its rank (`rank`: their mean),
    read once."""
    return int(elem * (batch * d_in + 2 * batch * d_out + adapters * rank * (d_in + d_out)))


# ---------------------------------------------------------------- contestants
# Each takes a Workload and returns `add(y)`, which adds every row's LoRA delta into y in place.


def make_ours(w: Workload) -> Callable:
    backend = TorchBackend()
    return lambda y: backend.add_lora(y, w.x, w.bank, w.tokens)


def make_triton(w: Workload) -> Callable:
    from multilora_plugin.kernels.triton_ops import TritonBackend  # imports triton: only on the GPU path

    backend = TritonBackend()
    return lambda y: backend.add_lora(y, w.x, w.bank, w.tokens)


def make_peft_loop(w: Workload) -> Callable:
    adapter_names = list(w.rows)  # PEFT gets one adapter name per row; here the name is the slot
    ranks = w.lora_ranks.tolist()  # PEFT knows each adapter's rank as a Python int
    x, lora_a, lora_b = w.x, w.lora_a, w.lora_b

    def add(y: torch.Tensor) -> None:
        for slot in dict.fromkeys(adapter_names):  # distinct adapters, in order of first use
            idx = [i for i, name in enumerate(adapter_names) if name == slot]  # rebuilt in every layer
            r = ranks[slot]
            sub = x[idx]  # [n, in]
            y[idx] += (sub @ lora_a[slot, :r].T) @ lora_b[slot, :, :r].T  # [n, r] @ [r, out]

    return add


def make_gather_bmm(w: Workload) -> Callable:
    slots = torch.tensor(w.rows, device=w.x.device)  # [T]; no base-model rows here, so nothing to mask
    x3 = w.x.unsqueeze(1)  # [T, 1, in]

    def add(y: torch.Tensor) -> None:
        a = w.lora_a.index_select(0, slots)  # [T, R, in]
        b = w.lora_b.index_select(0, slots)  # [T, out, R]
        h = torch.bmm(x3, a.transpose(1, 2))  # [T, 1, R]
        y += torch.bmm(h, b.transpose(1, 2)).squeeze(1)  # [T, 1, out] -> [T, out]

    return add


MAKERS = {"ours": make_ours, "triton": make_triton, "peft_loop": make_peft_loop, "gather_bmm": make_gather_bmm}


# ---------------------------------------------------------------- timing


def steady_malloc() -> bool:
    """Fix glibc's malloc thresholds so a freed buffer is reused, not unmapped and faulted in again.

    Returns whether it took (False off glibc).
    """
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def cpu_block(fn: Callable, calls: int) -> float:
    """Seconds for `calls` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - start


def cuda_block(fn: Callable, calls: int) -> float:
    """GPU seconds for `calls` back-to-back calls, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(fns: Dict[str, Callable], block: Callable, min_time: float, max_reps: int, warmup: int):
    """Median seconds per call of each function, timed in interleaved blocks.

    Returns ({name: median seconds per call}, {name: timed calls}).
    """
    calls = {}
    for name, fn in fns.items():  # warm up, and size blocks to about min_time / BLOCKS
        one = min(block(fn, 1) for _ in range(warmup))
        calls[name] = max(1, min(max_reps // BLOCKS, int(min_time / BLOCKS / max(one, 1e-9))))
    per_call = {name: [] for name in fns}
    spent, reps = dict.fromkeys(fns, 0.0), dict.fromkeys(fns, 0)
    rounds = 0
    while True:
        for name, fn in fns.items():  # one block of each contestant per round
            seconds = block(fn, calls[name])
            per_call[name].append(seconds / calls[name])
            spent[name] += seconds
            reps[name] += calls[name]
        rounds += 1
        if rounds >= MIN_BLOCKS and all(spent[n] >= min_time or reps[n] >= max_reps for n in fns):
            break
    return {name: statistics.median(v) for name, v in per_call.items()}, reps


# ---------------------------------------------------------------- sweep


def agreement(fns: Dict[str, Callable], y: torch.Tensor, tol: float) -> Tuple[bool, float]:
    """Whether every contestant gives the first one's y (allclose); and the largest difference."""
    outs = {}
    for name, fn in fns.items():
        outs[name] = y.clone()
        fn(outs[name])
    first, *rest = (out.float() for out in outs.values())
    ok = all(torch.allclose(out, first, rtol=tol, atol=tol) for out in rest)
    worst = max(((out - first).abs().max().item() for out in rest), default=0.0)
    return ok, worst


def run_config(suite: Suite, w: Workload, shape: Tuple[int, int], rank: int, pattern: str, args) -> dict:
    fns = {name: MAKERS[name](w) for name in suite.contestants}
    ok, worst = agreement(fns, w.y, suite.tol)
    scratch = w.y.clone()  # timed calls keep adding into one y
    timed = {name: (lambda fn=fn: fn(scratch)) for name, fn in fns.items()}
    block = cuda_block if suite.device == "cuda" else cpu_block
    seconds, reps = measure(timed, block, args.min_time, args.max_reps, args.warmup)
    main, *others = suite.contestants
    batch, (d_in, d_out) = len(w.rows), shape
    used = w.lora_ranks.tolist()
    mean_rank = sum(used[s] for s in set(w.rows)) / w.adapters_used
    nbytes = minimal_bytes(batch, d_in, d_out, w.adapters_used, mean_rank, w.x.element_size())
    gbs = nbytes / seconds[main] / 1e9
    return dict(
        device=suite.device, dtype=str(suite.dtype).removeprefix("torch."), shape=f"{d_in}x{d_out}",
        d_in=d_in, d_out=d_out, rank=rank, slot_rank=w.lora_a.shape[1], batch=batch, pattern=pattern,
        adapters=w.adapters_used, us={n: s * 1e6 for n, s in seconds.items()}, reps=reps,
        minimal_bytes=nbytes, gbs=gbs, hbm_fraction=gbs / args.hbm_gbs if suite.device == "cuda" else None,
        speedup={o: seconds[o] / seconds[main] for o in others}, agree=ok, max_abs_diff=worst,
    )


def sweep(suite: Suite, args) -> List[dict]:
    num_slots = slots_needed(args.batches, args.patterns, args.seed)
    slot_of = slot_of_adapter(num_slots, args.slot_order, args.seed)
    total = len(args.shapes) * len(args.ranks) * len(args.batches) * len(args.patterns)
    results = []
    for d_in, d_out in args.shapes:
        for mix in args.ranks:
            rank = rank_label(mix)
            a, b, ranks = make_weights(num_slots, mix, args.slot_rank or max(mix), d_in, d_out, args.seed)
            a, b = a.to(suite.device, suite.dtype), b.to(suite.device, suite.dtype)
            ranks = ranks.to(suite.device)
            bank = SlotBank.from_padded(a, b, ranks)
            for batch in args.batches:
                gen = torch.Generator().manual_seed(args.seed + 2)
                x = torch.randn(batch, d_in, generator=gen).to(suite.device, suite.dtype)  # [T, in]
                y = torch.randn(batch, d_out, generator=gen).to(suite.device, suite.dtype)  # [T, out]
                for pattern in args.patterns:
                    rows = tuple(slot_of[k] for k in row_adapters(pattern, batch, args.seed))
                    tokens = BatchMapping(rows, num_slots).tokens(batch, torch.device(suite.device))
                    w = Workload(rows, x, y, a, b, ranks, tokens, bank)
                    result = run_config(suite, w, (d_in, d_out), rank, pattern, args)
                    results.append(result)
                    times = " ".join(f"{n} {us:.1f}" for n, us in result["us"].items())
                    flag = "" if result["agree"] else f"  DISAGREE (max |diff| {result['max_abs_diff']:.2e})"
                    print(f"[{suite.device} {len(results)}/{total}] {d_in}x{d_out} r{rank} b{batch} {pattern}: "
                          f"{times} µs{flag}", file=sys.stderr, flush=True)
    return results


# ---------------------------------------------------------------- report


def table(suite: Suite, results: List[dict]) -> str:
    main, *others = suite.contestants
    head = ["shape", "rank", "batch", "pattern", "adapters"] + [f"{n} µs" for n in suite.contestants]
    head += [f"{main} GB/s"] + ([f"{main} % HBM"] if suite.device == "cuda" else [])
    head += [f"{main} vs {o}" for o in others]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for r in results:
        cells = [r["shape"], str(r["rank"]), str(r["batch"]), r["pattern"] + ("" if r["agree"] else " **DISAGREE**"),
                 str(r["adapters"])]
        cells += [f"{r['us'][n]:.1f}" for n in suite.contestants] + [f"{r['gbs']:.2f}"]
        if suite.device == "cuda":
            cells.append(f"{100 * r['hbm_fraction']:.1f}%")
        cells += [f"{r['speedup'][o]:.2f}x" for o in others]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def geomean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def summarize(suite: Suite, results: List[dict]) -> Dict[str, Dict[str, float]]:
    """{pattern or "all": {competitor: geometric-mean speedup of the first contestant over it}}."""
    main, *others = suite.contestants
    groups = {p: [r for r in results if r["pattern"] == p] for p in dict.fromkeys(r["pattern"] for r in results)}
    groups["all"] = results
    return {p: {o: geomean([r["speedup"][o] for r in rs]) for o in others} for p, rs in groups.items()}


def summary_table(suite: Suite, summary: Dict[str, Dict[str, float]]) -> str:
    main, *others = suite.contestants
    lines = [f"| pattern | {' | '.join(f'{main} vs {o}' for o in others)} |", "|---|" + "---:|" * len(others)]
    lines += [f"| {p} | {' | '.join(f'{s[o]:.2f}x' for o in others)} |" for p, s in summary.items()]
    return "\n".join(lines)


def plot(results: List[dict], suites: List[Suite], path: str) -> Optional[str]:
    """µs vs batch at one rank: a panel per (device, shape) and pattern, a line per contestant.

    Returns why nothing was saved, or None.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e .[bench]); no plot"
    ranks = sorted({r["rank"] for r in results if isinstance(r["rank"], int)}) or [results[0]["rank"]]
    rank = PLOT_RANK if PLOT_RANK in ranks else ranks[0]
    picked = [r for r in results if r["rank"] == rank]
    panels = list(dict.fromkeys((r["device"], r["shape"]) for r in picked))
    patterns = list(dict.fromkeys(r["pattern"] for r in picked))
    fig, axes = plt.subplots(len(panels), len(patterns), squeeze=False, sharey="row",
                             figsize=(3.2 * len(patterns), 2.8 * len(panels)))
    for (device, shape), row in zip(panels, axes):
        contestants = next(s.contestants for s in suites if s.device == device)
        for pattern, ax in zip(patterns, row):
            cell = sorted((r for r in picked if (r["device"], r["shape"], r["pattern"]) == (device, shape, pattern)),
                          key=lambda r: r["batch"])
            for name in contestants:
                ax.plot([r["batch"] for r in cell], [r["us"][name] for r in cell], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{device} {shape} {pattern}", fontsize=9)
            ax.set_xlabel("batch")
        row[0].set_ylabel(f"µs per op (rank {rank})")
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python"] + sys.argv) if argv is None else shlex.join(["python", sys.argv[0]] + argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "default" if args.default_malloc or not steady_malloc() else "steady"
    suites = [CPU_SUITE if d == "cpu" else CUDA_SUITE for d in args.devices]
    if args.contestants:
        suites = [dataclasses.replace(s, contestants=tuple(dict.fromkeys(args.contestants))) for s in suites]
    results, summaries, out = [], {}, []
    with torch.inference_mode():
        for suite in suites:
            found = sweep(suite, args)
            results += found
            summaries[suite.device] = summarize(suite, found)
            out += [f"## {suite.device} ({str(suite.dtype).removeprefix('torch.')}), median µs per op", "",
                    table(suite, found), "",
                    f"Geometric-mean speedup of {suite.contestants[0]} ({suite.device}):", "",
                    summary_table(suite, summaries[suite.device]), ""]
    agree = all(r["agree"] for r in results)
    num_slots = slots_needed(args.batches, args.patterns, args.seed)
    out += [f"all contestants agree: {'yes' if agree else 'NO'}",
            f"{num_slots} slots, {args.slot_order}, slot width {args.slot_rank or 'the rank'}; "
            f"timing: warm-up {args.warmup}, min-time {args.min_time} s, max-reps {args.max_reps}",
            f"torch {torch.__version__}, threads {torch.get_num_threads()}, malloc {malloc}"
            + (f", {torch.cuda.get_device_name()}" if "cuda" in args.devices else ""),
            f"command: {command}"]
    print("\n".join(out))
    if args.plot:
        why = plot(results, suites, args.plot)
        print(why or f"plot: {args.plot}", file=sys.stderr if why else sys.stdout)
    if args.json:
        config = {**vars(args), "shapes": [f"{i}x{o}" for i, o in args.shapes]}
        with open(args.json, "w") as f:
            json.dump(dict(config=config, torch=torch.__version__, threads=torch.get_num_threads(), malloc=malloc,
                           command=command, all_agree=agree, results=results, summary=summaries), f, indent=2)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
