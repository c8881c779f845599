"""Decode with the kinds of adapter and base people train on: MoE experts, QLoRA, DoRA, trained heads.

Every row of one batch has its own adapter; throughput against the base model and against PEFT:

  --kind moe    a tiny random Mixtral (fused 3-D experts, top-2) and `--adapters` PEFT adapters made with
                `target_modules="all-linear"` (attention, every expert's gate_up_proj and down_proj, the
                router). PEFT cannot mix them (`ParamWrapper` refuses `adapter_names`): peft-1 serves
                each adapter's rows with a `generate` of their own after `set_adapter`.
  --kind qlora  a tiny random Llama loaded in 4-bit (bitsandbytes nf4) and plain LoRA adapters on every
                linear layer; peft is PEFT's own mixed batch (`adapter_names=`) on the same 4-bit base.
  --kind dora   a tiny random Llama and DoRA adapters on every linear layer; ours-lora runs the same
                ranks without DoRA (the cost of the rescale), peft-1 PEFT's DoRA one adapter at a time
                (PEFT refuses `adapter_names` with DoRA).
  --kind saved  a tiny random Llama and adapters on every linear layer that also trained the LM head
                (`modules_to_save=["lm_head"]`, a full vocab x hidden copy each); ours-lora runs the same
                ranks without the heads, peft is PEFT's own mixed batch (`adapter_names=`).

Each contestant warms up once, then `--repeats` interleaved timed rounds; throughput is batch *
new_tokens / median time. Our tokens must equal PEFT's, row by row (exit code 1 otherwise; see
`parting_gaps` for the cases where low precision may part them at a near-tie).

    python benchmarks/bench_kinds.py --kind moe                  # 8 MoE adapters
    python benchmarks/bench_kinds.py --kind qlora --json out.json
    python benchmarks/bench_kinds.py --kind dora
    python benchmarks/bench_kinds.py --kind saved
    python benchmarks/bench_kinds.py --kind moe --quick          # a smoke run at tiny sizes
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
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import benchmark  # noqa: E402  (warm-up, then interleaved timed rounds)

import multilora_plugin  # noqa: E402
from multilora_plugin import toy  # noqa: E402

KINDS = ("moe", "qlora", "dora", "saved")
MIXED_IN_PEFT = ("qlora", "saved")  # kinds PEFT mixes in one batch itself (`adapter_names=`)
WITHOUT = {"dora": dict(use_dora=True), "saved": dict(modules_to_save=["lm_head"])}  # kinds also run without it


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=KINDS, default="moe")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank; PEFT gives the fused gate_up_proj twice that")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer (top-2 routing)")
    p.add_argument("--intermediate", type=int, default=512, help="width of each expert (MoE) or of the MLP")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU kit's moe and qlora parts)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (a smoke run)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.batch, args.new_tokens, args.hidden, args.layers = 3, 4, 3, 64, 2
        args.intermediate, args.experts, args.vocab, args.repeats, args.prompt_len = 64, 4, 256, 1, 4
    args.torch_dtype = getattr(torch, args.dtype)
    return args


def build_base(args, root: str):
    """(a function that builds the base model anew, the base model for making adapters)."""
    sizes = dict(seed=args.seed, hidden_size=args.hidden, num_layers=args.layers, intermediate_size=args.intermediate,
                 vocab_size=args.vocab, num_heads=8, dtype=args.torch_dtype)
    if args.kind != "qlora":
        extra = dict(num_experts=args.experts) if args.kind == "moe" else {}
        base = toy.tiny_model("mixtral" if args.kind == "moe" else "llama", **sizes, **extra)
        return lambda: copy.deepcopy(base).to(args.device), base
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = toy.tiny_model("llama", **{**sizes, "dtype": torch.float32})
    base.save_pretrained(os.path.join(root, "base"))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=args.torch_dtype)

    def fresh():
        model = AutoModelForCausalLM.from_pretrained(os.path.join(root, "base"), quantization_config=config,
                                                     dtype=args.torch_dtype, device_map=args.device).eval()
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
        return model

    return fresh, base


def build_adapters(base, root: str, args) -> Dict[str, Dict[str, str]]:
    """{set name: {adapter name: directory}}: "main" is what ours and PEFT serve; for DoRA and saved
    heads also "lora", the same ranks and seeds without them."""
    spec = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    sets = {"main": WITHOUT.get(args.kind, {})}
    if args.kind in WITHOUT:
        sets["lora"] = {}
    return {kind: {f"a{i}": toy.make_adapter(base, os.path.join(root, kind, f"a{i}"), seed=args.seed + 1 + i,
                                             **spec, **extra) for i in range(args.adapters)}
            for kind, extra in sets.items()}


class Contestants(dict):
    """{name: () -> generated ids}, and the PEFT model they were made with."""

    peft = None


def make_contestants(fresh: Callable, adapters: Dict[str, Dict[str, str]], rows: List[str], prompt: torch.Tensor,
                     args) -> Contestants:
    from peft import PeftModel

    gen = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    def ours_with(paths):
        model = multilora_plugin.wrap(fresh(), max_loras=len(paths), max_lora_rank=2 * args.rank)
        for name, path in paths.items():
            model.load_adapter(name, path)
        return model

    def call(model, ids, **kwargs):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen, **kwargs)

    paths = adapters["main"]
    plain, ours = fresh(), ours_with(paths)
    (first, first_path), *rest = paths.items()
    peft = PeftModel.from_pretrained(fresh(), first_path, adapter_name=first)
    for name, path in rest:
        peft.load_adapter(path, adapter_name=name)
    peft.eval()

    def peft_one_at_a_time():
        out = torch.zeros(prompt.shape[0], prompt.shape[1] + args.new_tokens, dtype=torch.long, device=prompt.device)
        for name in paths:
            picked = torch.tensor([i for i, r in enumerate(rows) if r == name], device=prompt.device)
            if len(picked):
                peft.set_adapter(name)
                out[picked] = call(peft, prompt[picked])
        return out

    contestants = Contestants(base=lambda: call(plain, prompt), ours=lambda: call(ours, prompt, adapter_names=rows))
    contestants.peft = peft
    if args.kind in WITHOUT:
        lora = ours_with(adapters["lora"])
        contestants["ours-lora"] = lambda: call(lora, prompt, adapter_names=rows)
    if args.kind in MIXED_IN_PEFT:
        contestants["peft"] = lambda: call(peft, prompt, adapter_names=rows)
    else:
        contestants["peft-1"] = peft_one_at_a_time
    return contestants


# On a bitsandbytes 4-bit base (repacked for a bf16 CPU kernel on CPUs with AVX512-BF16), rounding
# differences of the LoRA delta may flip a greedy choice where two logits are within a few bf16 steps. In a
# bf16 / fp16 model they may also flip a router's choice of expert, a discrete change: there the rows that
# equal PEFT's are reported, and the exit code does not depend on them.
NEAR_TIE = 0.05


def parting_gaps(ours: torch.Tensor, peft: torch.Tensor, peft_model, rows: List[str]) -> dict:
    """{row: PEFT's top-2 logit gap at the first token where our output and PEFT's differ}."""
    gaps = {}
    for i in range(ours.shape[0]):
        differ = (ours[i] != peft[i]).nonzero()
        if len(differ):
            at = int(differ[0])
            peft_model.set_adapter(rows[i])
            with torch.inference_mode():
                logits = peft_model(input_ids=peft[i:i + 1, :at]).logits[0, -1]
            top = torch.topk(logits.float(), 2).values
            gaps[i] = float(top[0] - top[1])
    return gaps


def report(args, tps: dict, ratios: dict, parted: dict, match: bool, command: str) -> str:
    shape = {"moe": f"experts={args.experts} (top-2) expert width={args.intermediate} ",
             "qlora": "bitsandbytes nf4 base ", "dora": "DoRA on every linear layer ",
             "saved": f"a trained lm_head copy ({args.vocab} x {args.hidden}) each "}[args.kind]
    lines = [f"kind={args.kind} adapters={args.adapters} rank={args.rank} batch={args.batch} prompt={args.prompt_len} "
             f"new_tokens={args.new_tokens} hidden={args.hidden} layers={args.layers} {shape}{args.device} "
             f"{args.dtype} repeats={args.repeats}", "", "| contestant | tokens/s | vs base |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:.1f} | {value / tps['base']:.2f}x |" for name, value in tps.items()]
    lines += [""] + [f"{k}: {v:.3f}" for k, v in ratios.items()]
    lines += [f"rows whose tokens equal PEFT's: {args.batch - len(parted)}/{args.batch}"
              + (f"; the others part where PEFT's top-2 logits are {max(parted.values()):.4f} apart at most"
                 if parted else ""),
              f"tokens match PEFT: {'yes' if match else 'no'}",
              f"torch {torch.__version__}, threads {torch.get_num_threads()}", f"command: {command}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python"] + sys.argv) if argv is None else shlex.join(["python", sys.argv[0]] + argv)
    torch.manual_seed(args.seed)
    prompt = torch.randint(4, args.vocab, (args.batch, args.prompt_len)).to(args.device)
    with tempfile.TemporaryDirectory() as root:
        fresh, base = build_base(args, root)
        adapters = build_adapters(base, root, args)
        rows = [f"a{i % args.adapters}" for i in range(args.batch)]
        contestants = make_contestants(fresh, adapters, rows, prompt, args)
        with torch.inference_mode():
            times, outputs = benchmark(contestants, args.repeats)
        peft_name = "peft" if args.kind in MIXED_IN_PEFT else "peft-1"
        parted = parting_gaps(outputs["ours"], outputs[peft_name], contestants.peft, rows)
    match = not parted or (args.kind == "qlora" and max(parted.values()) < NEAR_TIE)
    tokens = args.batch * args.new_tokens
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    pairs = [("ours", "base"), (peft_name, "base"), ("ours", peft_name)]
    if args.kind in WITHOUT:
        pairs.append(("ours", "ours-lora"))
    ratios = {f"{a}/{b}": tps[a] / tps[b] for a, b in pairs}
    print(report(args, tps, ratios, parted, match, command))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "torch_dtype"}
        with open(args.json, "w") as f:
            json.dump(dict(config=config, tokens_match_peft=match, parted_rows=parted, tokens_per_s=tps, ratios=ratios,
                           seconds=times, torch=torch.__version__, threads=torch.get_num_threads(),
                           command=command), f, indent=2)
    return 0 if match or args.torch_dtype != torch.float32 else 1


if __name__ == "__main__":
    sys.exit(main())
