"""Tune the Triton kernels' launch configs on this device; the best ones go to a JSON file that
`multilora_plugin/kernels/tuning.py` reads for this device name.

For each op (BGMV shrink / expand: decode, one token per row, every row its own adapter; SGMV shrink /
expand: prefill, `--segments` adapters of `size` tokens each), each shape of `--shapes`, each rank of
`--ranks` and each size of `--bgmv-sizes` / `--sgmv-sizes`, a coordinate descent over the fields of
`LaunchConfig`, starting from the untuned default: each field in turn takes each of its candidate
values, and the fastest config whose output agrees with the torch reference is kept; two passes. A
config that fails to compile or launch (too much shared memory, say) is skipped. The search stops
at `--budget-s` and writes what it found so far; the most used sizes (rank 16, then 64, then 8) go
first.

    python benchmarks/gpu/tune.py --out multilora_plugin/kernels/tuned/nvidia-h200.json
    TRITON_INTERPRET=1 python benchmarks/gpu/tune.py --dry-run --out /tmp/tuned.json   # CPU, tiny

Timing: CUDA events around blocks of `--reps` calls, the median of three blocks (wall time under the
interpreter). The file records, per op and size, the best config and its speedup over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

if "--dry-run" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton at import

import torch  # noqa: E402
import triton  # noqa: E402

from multilora_plugin.kernels import SlotBank, triton_bgmv, triton_sgmv, tuning  # noqa: E402
from multilora_plugin.kernels.tuning import LaunchConfig  # noqa: E402

CANDIDATES = {  # field → values tried, per op
    "bgmv_shrink": {"block_k": (64, 128, 256, 512), "split_k": (1, 2, 4, 8, 16, 32), "num_warps": (1, 2, 4, 8),
                    "num_stages": (1, 2, 3, 4)},
    "bgmv_expand": {"block_n": (64, 128, 256, 512), "block_r": (16, 32, 64), "num_warps": (1, 2, 4, 8),
                    "num_stages": (1, 2, 3)},
    "sgmv_shrink": {"block_m": (16, 32, 64), "block_k": (32, 64, 128, 256), "num_warps": (2, 4, 8),
                    "num_stages": (2, 3, 4)},
    "sgmv_expand": {"block_m": (16, 32, 64), "block_n": (32, 64, 128, 256), "num_warps": (2, 4, 8),
                    "num_stages": (2, 3, 4)},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"], help="in x out")
    p.add_argument("--ranks", nargs="+", type=int, default=[16, 64, 8], help="slot ranks, most important first")
    p.add_argument("--bgmv-sizes", nargs="+", type=int, default=[32, 64, 8, 1], help="tokens (decode rows)")
    p.add_argument("--sgmv-sizes", nargs="+", type=int, default=[128, 512, 16], help="tokens per segment")
    p.add_argument("--segments", type=int, default=4, help="adapters in an SGMV launch")
    p.add_argument("--reps", type=int, default=20, help="calls per timed block")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop searching after this many seconds")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    if args.dry_run:
        args.shapes, args.ranks, args.bgmv_sizes, args.sgmv_sizes = ["32x48"], [8], [2], [16]
        args.segments, args.reps, args.dtype = 2, 1, "float32"
        args.budget_s = min(args.budget_s, 60.0)
    return args


@dataclasses.dataclass
class Launch:
    """One op at one size, with its inputs and the reference output."""

    op: str
    size: int
    rank: int
    features: int
    run: Callable[[LaunchConfig], torch.Tensor]
    expected: torch.Tensor
    tol: float


def make_launch(op: str, size: int, rank: int, d_in: int, d_out: int, args, device: str) -> Launch:
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    slots = args.segments if op.startswith("sgmv") else min(size, 64)
    tokens = size * args.segments if op.startswith("sgmv") else size
    x = (torch.randn(tokens, d_in, generator=gen) / d_in ** 0.5).to(device, dtype)
    a = torch.randn(slots, rank, d_in, generator=gen).to(device, dtype)
    b = (torch.randn(slots, d_out, rank, generator=gen) / rank ** 0.5).to(device, dtype)
    h = torch.randn(tokens, rank, generator=gen).to(device)  # fp32, as the shrink gives it
    y = torch.randn(tokens, d_out, generator=gen).to(device, dtype)
    ranks = torch.full((slots,), rank, dtype=torch.int32, device=device)
    bank = SlotBank.from_padded(a, b, ranks)  # packed, as slot memory holds the pairs
    w, a_off, b_off = bank.storage, bank.a_offsets, bank.b_offsets
    token_slot = torch.arange(tokens, device=device) // (size if op.startswith("sgmv") else 1) % slots
    int32 = dict(dtype=torch.int32, device=device)
    index = torch.arange(tokens, **int32)
    seg = (torch.arange(args.segments, **int32), torch.arange(args.segments, **int32) * size,
           torch.full((args.segments,), size, **int32))
    ref_h = torch.einsum("ti,tri->tr", x.float(), a.float()[token_slot])
    ref_y = y.float() + torch.einsum("tr,tor->to", h, b.float()[token_slot])
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    features = d_in if op.endswith("shrink") else d_out
    if op == "bgmv_shrink":
        run = lambda cfg: triton_bgmv.bgmv_shrink(x, w, a_off, ranks, token_slot.int(), rank, cfg=cfg)  # noqa: E731
        return Launch(op, size, rank, features, run, ref_h, tol)
    if op == "bgmv_expand":
        def run(cfg):
            out = y.clone()
            triton_bgmv.bgmv_expand(out, h, w, b_off, ranks, token_slot.int(), cfg=cfg)
            return out
        return Launch(op, size, rank, features, run, ref_y, tol)
    if op == "sgmv_shrink":
        run = lambda cfg: triton_sgmv.sgmv_shrink(x, w, a_off, ranks, index, *seg, size, rank, cfg=cfg)  # noqa: E731
        return Launch(op, size, rank, features, run, ref_h, tol)

    def run(cfg):
        out = y.clone()
        triton_sgmv.sgmv_expand(out, h, w, b_off, ranks, index, *seg, size, cfg=cfg)
        return out
    return Launch(op, size, rank, features, run, ref_y, tol)


def time_config(launch: Launch, cfg: LaunchConfig, reps: int, device: str) -> Optional[float]:
    """Median µs per call, or None when the config fails or disagrees with the reference."""
    try:
        out = launch.run(cfg)  # compiles
        if not torch.allclose(out.float(), launch.expected, rtol=launch.tol, atol=launch.tol):
            return None
        blocks = []
        for _ in range(3 if device == "cuda" else 1):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    launch.run(cfg)
                end.record()
                end.synchronize()
                blocks.append(start.elapsed_time(end) * 1e3 / reps)
            else:
                t0 = time.perf_counter()
                for _ in range(reps):
                    launch.run(cfg)
                blocks.append((time.perf_counter() - t0) * 1e6 / reps)
        return statistics.median(blocks)
    except Exception:  # noqa: BLE001 - out of resources, or an invalid combination: not a candidate
        return None


def valid(op: str, cfg: LaunchConfig, launch: Launch) -> bool:
    if op == "bgmv_shrink" and cfg.split_k > triton.cdiv(launch.features, cfg.block_k):
        return False
    if op == "bgmv_expand" and cfg.block_r > max(16, triton.next_power_of_2(launch.rank)):
        return False
    return True


def descend(launch: Launch, deadline: float, reps: int, device: str) -> dict:
    """Coordinate descent from the default config; returns what it found."""
    default = tuning.default_config(launch.op, launch.size, launch.rank, launch.features)
    default_us = time_config(launch, default, reps, device)
    best, best_us, tried = default, default_us, 1
    for _ in range(2):
        for name, values in CANDIDATES[launch.op].items():
            for value in values:
                if time.monotonic() > deadline:
                    break
                cfg = dataclasses.replace(best, **{name: value})
                if cfg == best or not valid(launch.op, cfg, launch):
                    continue
                us = time_config(launch, cfg, reps, device)
                tried += 1
                if us is not None and (best_us is None or us < best_us):
                    best, best_us = cfg, us
    return dict(op=launch.op, size=launch.size, rank=launch.rank, features=launch.features,
                default_us=default_us, best_us=best_us, tried=tried, config=dataclasses.asdict(best),
                speedup=None if not (default_us and best_us) else default_us / best_us)


def launches(args, device: str) -> List[Tuple[str, int, int, int, int]]:
    """(op, size, rank, in, out) in order of value, without repeats of (op, size, rank, features)."""
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    seen, out = set(), []
    for rank in args.ranks:
        for op in tuning.OPS:
            for size in (args.bgmv_sizes if op.startswith("bgmv") else args.sgmv_sizes):
                for d_in, d_out in shapes:
                    key = (op, size, rank, d_in if op.endswith("shrink") else d_out)
                    if key not in seen:
                        seen.add(key)
                        out.append((op, size, rank, d_in, d_out))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("tune.py needs a CUDA device, or --dry-run (TRITON_INTERPRET=1) on CPU", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s
    found: List[dict] = []
    todo = launches(args, device)
    for op, size, rank, d_in, d_out in todo:
        if time.monotonic() > deadline:
            break
        result = descend(make_launch(op, size, rank, d_in, d_out, args, device), deadline, args.reps, device)
        found.append(result)
        print(f"[tune {len(found)}/{len(todo)}] {op} size {size} rank {rank} features {result['features']}: "
              f"{result['default_us'] or float('nan'):.1f} → {result['best_us'] or float('nan'):.1f} µs "
              f"({result['tried']} configs)", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET)"
    configs: Dict[str, Dict[str, dict]] = {}
    for r in found:
        if r["best_us"] is not None:
            configs.setdefault(r["op"], {})[tuning.key(r["size"], r["rank"], r["features"])] = r["config"]
    doc = dict(device=name, triton=triton.__version__, torch=torch.__version__, dtype=args.dtype,
               complete=len(found) == len(todo), configs=configs, measured=found)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    speedups = [r["speedup"] for r in found if r["speedup"]]
    print(f"tuned {len(found)}/{len(todo)} launches on {name}; speedup over the defaults: "
          + (f"median {statistics.median(speedups):.2f}x, max {max(speedups):.2f}x" if speedups else "none measured")
          + f"; written to {path}")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
