"""What HTTP costs: the server under concurrent streaming clients vs. the same engine driven in-process.

One workload (`--requests` requests over `--adapters` adapters, round-robin, random prompts of
`--prompt-len` words, `--new-tokens` greedy tokens each with `ignore_eos`) is served twice, on two
copies of one tiny random Llama with the same adapters and settings:

  direct   `LLM.generate` on the engine, every request available at t = 0
  http     `multilora serve`'s app on a free local port; `--clients` threads, each a real `openai`
           client streaming its share of the requests one after another (/v1/completions)

Both engines step the same way; the difference is the HTTP server, JSON and SSE framing, the asyncio
hand-off and the clients (which share the machine's cores). Reported: tokens/s of each, their ratio,
and the HTTP clients' time to first token (p50, p99). The streamed text must equal the direct text
for every request (exit code 1 otherwise).

    python benchmarks/bench_server.py                 # 256 requests, 32 clients (about a minute, 2 cores)
    python benchmarks/bench_server.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import random
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 24 requests, 6 clients, 8 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.clients, args.new_tokens, args.hidden, args.layers = 24, 6, 8, 64, 2
    torch.set_num_threads(2)

    from openai import OpenAI

    import multilora_plugin
    from multilora_plugin import LLM, LoRARequest, SamplingParams, toy
    from multilora_plugin.cli import running_server
    from multilora_plugin.integrations.server import create_app

    vocab = 256
    base = toy.tiny_model("llama", hidden_size=args.hidden, num_layers=args.layers, vocab_size=vocab,
                          intermediate_size=2 * args.hidden)
    tokenizer = toy.tiny_tokenizer(vocab)
    words = [w for w in tokenizer.get_vocab() if not w.startswith("<")]
    rng = random.Random(0)
    names = [f"a{i}" for i in range(args.adapters)]
    jobs = [(names[i % len(names)], " ".join(rng.choice(words) for _ in range(args.prompt_len)))
            for i in range(args.requests)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)

    with tempfile.TemporaryDirectory(prefix="bench-server-") as root:
        paths = toy.make_adapters(base, root, names, r=8)

        def engine_model():
            model = multilora_plugin.wrap(copy.deepcopy(base), max_loras=args.max_loras)
            for name, path in paths.items():
                model.load_adapter(name, path)
            return model

        llm = LLM(engine_model(), tokenizer, load_entrypoints=False, max_num_seqs=args.max_num_seqs)
        lora = {name: LoRARequest(name, i + 1) for i, name in enumerate(names)}
        started = time.perf_counter()
        direct = llm.generate([p for _, p in jobs], params, [lora[a] for a, _ in jobs], use_tqdm=False)
        direct_s = time.perf_counter() - started

        engine = multilora_plugin.Engine(engine_model(), tokenizer, load_entrypoints=False,
                                         max_num_seqs=args.max_num_seqs)
        ttft, texts = [], [None] * len(jobs)
        with running_server(create_app(engine, served_model_name="tiny")) as url:
            def client(c: int) -> None:
                api = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
                for i in range(c, len(jobs), args.clients):
                    adapter, prompt = jobs[i]
                    sent = time.perf_counter()
                    pieces = []
                    for chunk in api.completions.create(model=adapter, prompt=prompt, max_tokens=args.new_tokens,
                                                        temperature=0, stream=True, extra_body={"ignore_eos": True}):
                        if not pieces:
                            ttft.append(time.perf_counter() - sent)
                        pieces.append(chunk.choices[0].text)
                    texts[i] = "".join(pieces)

            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(client, range(args.clients)))
            http_s = time.perf_counter() - started
        engine.close()

    tokens = args.requests * args.new_tokens
    wrong = sum(t != d.outputs[0].text for t, d in zip(texts, direct))
    ttft.sort()
    print(f"$ python benchmarks/bench_server.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{args.requests} requests x {args.new_tokens} tokens over {args.adapters} adapters, max_loras="
          f"{args.max_loras}, max_num_seqs={args.max_num_seqs}, Llama hidden {args.hidden} x {args.layers} layers")
    print("| run | wall s | tokens/s | ratio |")
    print("|---|---|---|---|")
    print(f"| direct (`LLM.generate`) | {direct_s:.2f} | {tokens / direct_s:.0f} | 1.00 |")
    print(f"| http ({args.clients} streaming `openai` clients) | {http_s:.2f} | {tokens / http_s:.0f} | "
          f"{direct_s / http_s:.2f} |")
    print(f"HTTP time to first token: p50 {statistics.median(ttft) * 1000:.0f} ms, "
          f"p99 {ttft[int(0.99 * (len(ttft) - 1))] * 1000:.0f} ms; streamed text equal to direct: "
          f"{len(jobs) - wrong}/{len(jobs)}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
