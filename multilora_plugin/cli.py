"""The `multilora` command.

    multilora demo      a tiny Llama, a tokenizer and four PEFT adapters built locally; one mixed
                        batch (three adapters and the base model), then a stream of requests over all
                        four adapters and the base model through the continuous-batching engine with
                        two slots; every output checked against PEFT
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from typing import Optional, Sequence

import torch

# name → adapter settings: different ranks, alphas, target sets and scaling rules
DEMO_ADAPTERS = {
    "sql": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=1),
    "chat": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=2),
    "poem": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True, seed=3),
    "code": dict(r=2, lora_alpha=4, target_modules=["o_proj"], seed=4),
}
DEMO_ROWS = [
    ("sql", "show me the number of students in each school"),
    (None, "tell me a story about a little house"),
    ("chat", "how are you this morning"),
    ("poem", "the water at night"),
]


def run_demo(new_tokens: int = 12, seed: int = 0) -> int:
    """Build everything, serve one mixed batch and a stream of requests through the engine, compare
    every output with PEFT. Returns an exit code."""
    from peft import PeftModel

    import multilora_plugin
    from multilora_plugin import toy

    started = time.perf_counter()
    vocab = 256
    base = toy.tiny_model("llama", seed=seed, hidden_size=64, num_layers=2, vocab_size=vocab)
    tokenizer = toy.tiny_tokenizer(vocab)
    with tempfile.TemporaryDirectory(prefix="multilora-demo-") as root:
        paths = {name: toy.make_adapter(base, f"{root}/{name}", **spec) for name, spec in DEMO_ADAPTERS.items()}
        model = multilora_plugin.wrap(copy.deepcopy(base), max_loras=4)
        for name, path in paths.items():
            info = model.load_adapter(name, path)
            print(f"loaded adapter {name!r:7} rank {info.rank:2}  {info.num_bytes / 1024:6.1f} KiB  "
                  f"({info.state.value})")
        names = [name for name, _ in DEMO_ROWS]
        batch = tokenizer([prompt for _, prompt in DEMO_ROWS], return_tensors="pt", padding=True)
        kwargs = dict(**batch, max_new_tokens=new_tokens, do_sample=False)
        peft = {None: base}
        with warnings.catch_warnings():  # peft calls a transformers method that transformers deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            for name in DEMO_ADAPTERS:
                peft[name] = PeftModel.from_pretrained(copy.deepcopy(base), paths[name]).eval()
        with torch.no_grad():
            out = model.generate(adapter_names=names, **kwargs)
            oracle = {name: peft[name].generate(**kwargs) for name in set(names)}
        width = batch["input_ids"].shape[1]
        print(f"\none batch of {len(names)} rows, {len(set(names) - {None})} adapters + base, "
              f"{new_tokens} new tokens (greedy):\n")
        failures = 0
        for row, (name, prompt) in enumerate(DEMO_ROWS):
            same = out[row].tolist() == oracle[name][row].tolist()
            failures += not same
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            print(f"  row {row}  adapter={str(name):5}  {'matches PEFT' if same else 'DIFFERS FROM PEFT'}")
            print(f"         prompt: {prompt}\n         output: {text}")
        stats = model.memory_stats()
        print(f"\nadapter cache: slots {model.slot_contents()}; {stats.cpu_entries} adapters "
              f"({stats.cpu_bytes / 1024:.0f} KiB) in CPU memory, {stats.gpu_bytes / 1024:.0f} KiB in slots; "
              f"{stats.slot_swaps} slot swaps")
        failures += _demo_engine(base, tokenizer, paths, peft, new_tokens)
    verdict = "every output matches PEFT" if not failures else f"{failures} output(s) differ from PEFT"
    print(f"\n{verdict} ({time.perf_counter() - started:.1f} s)")
    return 1 if failures else 0


def _demo_engine(base, tokenizer, paths, peft, new_tokens: int) -> int:
    """Requests over every demo adapter and the base model through `LLM` with only two slots, so
    adapters take turns; each output is checked against PEFT on that request alone."""
    import multilora_plugin
    from multilora_plugin import LLM, LoRARequest, SamplingParams

    model = multilora_plugin.wrap(copy.deepcopy(base), max_loras=2)
    llm = LLM(model, tokenizer, max_num_seqs=4)
    adapters = [None] + list(DEMO_ADAPTERS)
    lora = {name: LoRARequest(name, i + 1, paths[name]) for i, name in enumerate(DEMO_ADAPTERS)}
    jobs = [(adapters[i % len(adapters)], DEMO_ROWS[i % len(DEMO_ROWS)][1]) for i in range(10)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    outputs = llm.generate([p for _, p in jobs], params, [lora.get(a) for a, _ in jobs], use_tqdm=False)
    print(f"\ncontinuous batching: {len(jobs)} requests over {len(DEMO_ADAPTERS)} adapters + base, "
          f"max_loras=2, at most 4 running:\n")
    failures = 0
    for (name, _), output in zip(jobs, outputs):
        ids = torch.tensor([output.prompt_token_ids])
        with torch.no_grad():
            want = peft[name].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=new_tokens, eos_token_id=None)[0, ids.shape[1]:].tolist()
        same = output.outputs[0].token_ids == want
        failures += not same
        print(f"  {output.request_id:7} adapter={str(name):5} {'matches PEFT' if same else 'DIFFERS FROM PEFT'}"
              f"  {output.outputs[0].text.strip()}")
    stats = llm.engine.stats()
    print(f"\nengine: {stats.steps} steps, {stats.generated_tokens} tokens, {stats.adapter_swaps} adapter swaps, "
          f"mean time to first token {stats.mean_ttft_s * 1000:.1f} ms, "
          f"mean inter-token latency {stats.mean_itl_s * 1000:.1f} ms")
    return failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="multilora", description="Serve many LoRA adapters on one model.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run one mixed-adapter batch on a tiny local model and check it against PEFT")
    demo.add_argument("--new-tokens", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(new_tokens=args.new_tokens, seed=args.seed)
    return 2


if __name__ == "__main__":
    sys.exit(main())
