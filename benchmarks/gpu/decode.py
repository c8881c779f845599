"""One decode step of a Llama-2-7B-shaped model: the base model vs the wrapped model serving 1, 8 and 32
distinct rank-16 adapters on all seven projections, eager and under a CUDA graph.

The model is built on the device with random weights (no download): hidden 4096, MLP 11008, 32 heads,
vocab 32000, `--layers` layers (32 by default: all of Llama-2-7B). The batch (`--batch` rows) is
prefilled with a random `--prompt-len`-token prompt, then `--steps` decode steps are timed (CUDA events,
median step). Contestants, in one process, on one model:

  base          the Hugging Face model before `wrap`
  wrapped, 0    wrapped, every row on the base model (the cost of the hooks alone)
  wrapped, n    wrapped, row i on slot i % n; the slots hold random rank-`--rank` weights written
                straight into the slot buffers (adapter loading is not what is measured here)

Eager steps use a `DynamicCache` growing by one token per step. Graph steps use a `StaticCache`: one
decode step (the hooks' mapping included, built before capture) is captured with `torch.cuda.graph`
and replayed; each replay writes the same KV position, which is what a serving loop's step costs at
that length. Graphs need CUDA; under `--dry-run` (tiny shapes, CPU, Triton interpreted) that mode is
reported as skipped.

    python benchmarks/gpu/decode.py --json decode.json
    python benchmarks/gpu/decode.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

if "--dry-run" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton at import

import torch  # noqa: E402

import multilora_plugin  # noqa: E402
from multilora_plugin import BatchMapping  # noqa: E402
from multilora_plugin.batch import with_cache  # noqa: E402
from multilora_plugin.kernels import SlotBank  # noqa: E402
from multilora_plugin.layers import MultiLoRALinear  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per contestant")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--backend", choices=("triton", "torch"), default="triton")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="eager steps only")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton interpreted)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.layers, args.hidden, args.intermediate, args.heads, args.vocab = 2, 64, 128, 4, 128
        args.batch, args.prompt_len, args.steps, args.rank, args.adapters = 4, 8, 2, 8, [1, 4]
    return args


def build_model(args, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(4096, args.prompt_len + args.steps + 8), initializer_range=0.02)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype, on its device: no copy of a 7B model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def fill_slots(model, num_slots: int, rank: int) -> None:
    """Random rank-`rank` adapters in every slot of every wrapped layer (drawn on the device)."""
    torch.manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, MultiLoRALinear):
            device, dtype = layer.device, layer.dtype
            a = torch.randn(num_slots, rank, layer.in_features, device=device, dtype=dtype) * layer.in_features ** -0.5
            b = torch.randn(num_slots, layer.out_features, rank, device=device, dtype=dtype) * 0.1 * rank ** -0.5
            ranks = torch.full((num_slots,), rank, device=device, dtype=torch.int32)
            layer.bank = SlotBank.from_padded(a, b, ranks)  # packed, as the slot memory holds them


def timer(device: torch.device) -> Callable[[Callable], float]:
    """Seconds one call of `fn` takes (CUDA events on GPU)."""
    def run(fn: Callable) -> float:
        if device.type != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return run


def eager_steps(model, prompt: torch.Tensor, steps: int, extra: dict, device: torch.device) -> List[float]:
    """Prefill, then `steps` timed decode steps on a DynamicCache; returns their seconds."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=prompt, use_cache=True, **with_cache(model, cache), **extra)
    token = out.logits[:, -1:].argmax(-1)
    times, time_one = [], timer(device)
    for _ in range(steps + 1):  # the first one warms up
        holder = {}

        def step():
            holder["out"] = model(input_ids=token, use_cache=True, **with_cache(model, cache), **extra)
        times.append(time_one(step))
        token = holder["out"].logits[:, -1:].argmax(-1)
    return times[1:]


def graph_steps(model, prompt: torch.Tensor, steps: int, extra: dict, device: torch.device) -> List[float]:
    """Prefill into a StaticCache, capture one decode step in a CUDA graph, time `steps` replays."""
    from transformers import StaticCache

    batch, length = prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=length + 8)
    out = model(input_ids=prompt, use_cache=True, cache_position=torch.arange(length, device=device),
                **with_cache(model, cache), **extra)
    token = out.logits[:, -1:].argmax(-1)
    position = torch.tensor([length], device=device)
    kwargs = dict(input_ids=token, use_cache=True, cache_position=position, position_ids=position.expand(batch, 1),
                  **with_cache(model, cache), **extra)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        for _ in range(3):
            model(**kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(**kwargs)
    time_one = timer(device)
    return [time_one(graph.replay) for _ in range(steps)]


def measure(model, prompt, args, device, mapping: Optional[BatchMapping]) -> Dict[str, dict]:
    extra = {} if mapping is None else {"lora_mapping": mapping}
    result = {}
    with torch.inference_mode():
        result["eager"] = dict(ms=1e3 * statistics.median(eager_steps(model, prompt, args.steps, extra, device)))
        if not args.graphs:
            return result
        if device.type != "cuda":
            result["graph"] = dict(skipped="CUDA graphs need a GPU")
            return result
        try:
            result["graph"] = dict(ms=1e3 * statistics.median(graph_steps(model, prompt, args.steps, extra, device)))
        except Exception as exc:  # noqa: BLE001 - reported, the other contestants go on
            result["graph"] = dict(error=f"{type(exc).__name__}: {exc}"[:500])
    return result


def report(results: Dict[str, dict], args, device_name: str) -> str:
    base = results["base"]
    lines = [f"Decode step, Llama shapes ({args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}), "
             f"batch {args.batch}, prompt {args.prompt_len}, rank {args.rank} on {', '.join(PROJECTIONS)}, "
             f"backend {args.backend}, on {device_name}", "",
             "| contestant | eager ms / step | vs base | graph ms / step | vs base (graph) |",
             "|---|---:|---:|---:|---:|"]

    def cell(mode: str, r: dict) -> str:
        got = r.get(mode, {})
        if "ms" not in got:
            return f"{got.get('skipped') or got.get('error') or '—'} | —"
        ref = base.get(mode, {}).get("ms")
        return f"{got['ms']:.2f} | " + (f"{got['ms'] / ref:.3f}×" if ref else "—")
    for name, r in results.items():
        lines.append(f"| {name} | {cell('eager', r)} | {cell('graph', r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    started = time.perf_counter()
    model = build_model(args, device)
    prompt = torch.randint(3, args.vocab, (args.batch, args.prompt_len), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    results: Dict[str, dict] = {"base": measure(model, prompt, args, device, None)}
    with torch.inference_mode():
        base_logits = model(input_ids=prompt).logits[:, -1].float()
    num_slots = max(args.adapters)
    wrapped = multilora_plugin.wrap(model, max_loras=num_slots, max_lora_rank=args.rank,
                                    target_modules=PROJECTIONS, backend=args.backend)
    fill_slots(wrapped, num_slots, args.rank)
    none = BatchMapping((-1,) * args.batch, num_slots)
    with torch.inference_mode():  # rows on the base model get exactly the base model's logits
        same = torch.equal(wrapped(input_ids=prompt, lora_mapping=none).logits[:, -1].float(), base_logits)
    results["wrapped, 0 adapters"] = measure(wrapped, prompt, args, device, none)
    for n in args.adapters:
        mapping = BatchMapping(tuple(i % n for i in range(args.batch)), num_slots)
        results[f"wrapped, {n} adapter" + ("s" if n != 1 else "")] = measure(wrapped, prompt, args, device, mapping)
    text = report(results, args, device_name)
    print(text)
    print(f"base rows equal to the base model: {same}; {time.perf_counter() - started:.1f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name, args=vars(args), results=results, base_rows_equal=same,
                           report=text), f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
