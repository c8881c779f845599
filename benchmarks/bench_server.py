"""What HTTP costs: the server under concurrent streaming clients vs. the same engine driven in-process.

One workload (`--requests` requests over `--adapters` adapters, round-robin, random prompts of
`--prompt-len` words, `--new-tokens` greedy tokens each with `ignore_eos`) is served three ways, on
copies of one tiny random Llama with the same adapters and settings:

  direct   `LLM.generate` on the engine, every request available at t = 0
  closed   the engine stepped in-process with the HTTP run's arrival pattern: `--clients` closed-loop
           clients, each adding its next request the moment its last one finished (no network, no
           JSON, no event loop). With fewer slots than adapters this pattern runs smaller batches
           than `direct` (only the requests of `max_loras` adapters among those in flight), so
           `closed` is the baseline that says what HTTP itself costs
  http     `multilora serve`'s app on a free local port; `--clients` threads, each a real `openai`
           client streaming its share of the requests one after another (/v1/completions), in a
           process of their own, as they would be on other machines (`--in-process-clients` puts them
           in the server's process, where they share its GIL)

The engines step the same way; what `http` adds is the HTTP server, JSON and SSE framing and the
asyncio hand-off, and the clients' own CPU on the same machine. The in-process runs use `--threads`
torch threads, the served engine `--server-threads` (as many by default); it runs in a process of
its own, as `multilora serve` runs it (`--no-engine-process`: in the server's process). Reported: tokens/s and ratios, steps and their times, the HTTP clients' time to
first token (p50, p99), the server process's CPU time per token (by thread) and the client process's.
The streamed text must equal the direct and closed-loop text for every request (exit code 1 otherwise).

    python benchmarks/bench_server.py --requests 96 --hidden 768 --layers 6   # the issue-18 workload
    python benchmarks/bench_server.py --quick                                  # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

import multilora_plugin
from multilora_plugin import LLM, LoRARequest, SamplingParams, hookimpl, toy
from multilora_plugin.integrations.engine_args import EngineArgs
from multilora_plugin.integrations.engine_process import EngineProcess
from multilora_plugin.integrations.local import running_server
from multilora_plugin.integrations.server import create_app


def _clients(url: str, jobs: list, clients: int, new_tokens: int) -> tuple:
    """Stream every job through `clients` openai clients; returns (texts, ttft seconds, wall seconds)."""
    from openai import OpenAI  # only where the clients run

    ttft, texts = [], [None] * len(jobs)

    def client(c: int) -> None:
        api = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for i in range(c, len(jobs), clients):
            adapter, prompt = jobs[i]
            sent = time.perf_counter()
            pieces = []
            for chunk in api.completions.create(model=adapter, prompt=prompt, max_tokens=new_tokens,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if not pieces:
                    ttft.append(time.perf_counter() - sent)
                pieces.append(chunk.choices[0].text)
            texts[i] = "".join(pieces)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return texts, ttft, time.perf_counter() - started


def _client_process(url: str, jobs: list, clients: int, new_tokens: int) -> tuple:
    """Run the clients in a new Python process (this file with `--clients-of URL`); the jobs go in on
    stdin and (texts, ttft, wall seconds, the process's CPU seconds) come back on stdout, as JSON."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--clients-of", url, "--clients", str(clients),
                           "--new-tokens", str(new_tokens)], input=json.dumps(jobs), capture_output=True,
                          text=True, check=True)
    return tuple(json.loads(done.stdout.splitlines()[-1]))


def _serve_as_clients(url: str, clients: int, new_tokens: int) -> None:
    jobs = json.load(sys.stdin)
    cpu = _process_cpu()
    texts, ttft, wall = _clients(url, jobs, clients, new_tokens)
    print(json.dumps([texts, ttft, wall, _process_cpu() - cpu]))


class _Steps:
    """A plugin that records each step: (seconds, requests prefilled, requests decoded)."""

    def __init__(self) -> None:
        self.steps = []

    @hookimpl
    def multilora_step_finished(self, stats) -> None:
        self.steps.append((stats.duration_s, stats.num_prefill, stats.num_decode))

    def summary(self) -> str:
        prefill = [s for s in self.steps if s[1]]
        decode = [s for s in self.steps if not s[1]]
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        return (f"{len(self.steps)} steps in {sum(s[0] for s in self.steps):.2f} s; {len(decode)} decode-only "
                f"({mean([s[0] for s in decode]) * 1e3:.1f} ms, {mean([s[2] for s in decode]):.1f} rows), "
                f"{len(prefill)} with a prefill ({mean([s[0] for s in prefill]) * 1e3:.1f} ms, "
                f"{mean([s[1] for s in prefill]):.1f} + {mean([s[2] for s in prefill]):.1f} rows)")


def _closed_loop(engine, jobs: list, clients: int, params) -> list:
    """Step `engine` in this thread with `clients` closed-loop clients (client c sends jobs c,
    c + clients, ... one after another); returns the texts."""
    texts, pending = [None] * len(jobs), {}

    def send(i: int) -> None:
        if i < len(jobs):
            adapter, prompt = jobs[i]
            engine.add_request(f"closed-{i}", prompt, params, adapter)
            pending[f"closed-{i}"] = i

    for c in range(clients):
        send(c)
    while pending:
        for out in engine.step():
            if out.finished:
                i = pending.pop(out.request_id)
                texts[i] = out.outputs[0].text
                send(i + clients)
    return texts


def _serve(args, base, tokenizer, paths: dict, jobs: list, server_threads: int, root: str) -> dict:
    """The http run: the app over an engine in its own process (as `multilora serve`), or in this one;
    the clients in their own process, or in this one. Returns what it measured."""
    steps_seen = _Steps()
    if args.engine_process:
        base.save_pretrained(os.path.join(root, "model"))
        tokenizer.save_pretrained(os.path.join(root, "model"))
        engine_args = EngineArgs(model=os.path.join(root, "model"), adapters=paths, max_loras=args.max_loras,
                                 max_num_seqs=args.max_num_seqs, cpu_threads=server_threads, device="cpu")
        backend = EngineProcess(engine_args)  # its adapters are read from disk on first use
        engine_cpu = lambda: _pid_cpu(backend.process.pid)  # noqa: E731
    else:
        model = multilora_plugin.wrap(copy.deepcopy(base), max_loras=args.max_loras)
        for name, path in paths.items():
            model.load_adapter(name, path)
        backend = multilora_plugin.Engine(model, tokenizer, load_entrypoints=False, max_num_seqs=args.max_num_seqs,
                                          plugins=[steps_seen])
        engine_cpu = lambda: 0.0  # noqa: E731 - counted in the server's process
    found = {"client_cpu": None}
    with running_server(create_app(backend, served_model_name="tiny")) as url:
        threads_before, cpu, engine_before = _thread_cpu(), _process_cpu(), engine_cpu()
        if args.in_process_clients:
            found["texts"], found["ttft"], found["wall"] = _clients(url, jobs, args.clients, args.new_tokens)
        else:
            found["texts"], found["ttft"], found["wall"], found["client_cpu"] = _client_process(
                url, jobs, args.clients, args.new_tokens)
        found["server_cpu"], found["engine_cpu"] = _process_cpu() - cpu, engine_cpu() - engine_before
        found["by_thread"] = {name: s - threads_before.get(name, 0.0) for name, s in _thread_cpu().items()}
        steps = [s for f in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in f.samples
                 if s.name == "multilora_steps_total"]
        found["steps"] = int(steps[0].value)
    backend.close()
    found["summary"] = steps_seen.summary() if steps_seen.steps else None
    return found


def _stat_cpu(path: str) -> tuple:
    """(task name, user + system CPU seconds) of a /proc/.../stat file (Linux)."""
    with open(path) as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return stat[stat.index("(") + 1:stat.rindex(")")], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pid_cpu(pid: int) -> float:
    """CPU seconds of process `pid` so far."""
    return _stat_cpu(f"/proc/{pid}/stat")[1]


NEAR_TIE = 1e-3  # log-probability margin under which fp32 rounding may pick either token


def _near_tie(llm, job: tuple, lora: dict, new_tokens: int, texts: set) -> bool:
    """Whether outputs of one request that differ between runs part where greedy decoding is a
    near-tie. A row's logits depend on its batch partners within fp32 rounding (other kernel shapes,
    other padding), so runs that batch a request differently may choose differently where the two
    best tokens are within `NEAR_TIE`. Generates the request alone, with the top-2 log-probabilities,
    and looks for such a step up to where the texts part."""
    adapter, prompt = job
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True, logprobs=2)
    (alone,) = llm.generate([prompt], params, lora[adapter], use_tqdm=False)
    completion = alone.outputs[0]
    ordered = sorted(texts | {completion.text})
    parted = min(next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for a, b in zip(ordered, ordered[1:]))
    for n, entry in enumerate(completion.logprobs, start=1):
        best = sorted(entry.values(), reverse=True)
        if len(best) > 1 and best[0] - best[1] < NEAR_TIE:
            return True
        if len(llm.engine.tokenizer.decode(completion.token_ids[:n])) > parted:  # past where the texts part
            return False
    return False


def _thread_cpu() -> dict:
    """CPU seconds of each thread of this process (Linux /proc), by name: Python threads by their
    name (asyncio's workers together), others (torch's OpenMP workers) by their task name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    seconds = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            comm, cpu = _stat_cpu(f"/proc/self/task/{tid}/stat")
        except OSError:  # the thread ended meanwhile
            continue
        name = names.get(int(tid), f"{comm} (not Python)")
        name = "asyncio workers" if name.startswith("asyncio") else name
        seconds[name] = seconds.get(name, 0.0) + cpu
    return seconds


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the in-process runs (default: torch's, every core)")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="torch threads of the served engine (default: as many as the in-process runs)")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="serve with the engine in a process of its own, as `multilora serve` does")
    parser.add_argument("--in-process-clients", action="store_true",
                        help="run the clients in the server's process (they then share its GIL)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 24 requests, 6 clients, 8 tokens")
    parser.add_argument("--clients-of", metavar="URL", help=argparse.SUPPRESS)  # the client process
    args = parser.parse_args(argv)
    if args.clients_of:
        _serve_as_clients(args.clients_of, args.clients, args.new_tokens)
        return 0
    if args.quick:
        args.requests, args.clients, args.new_tokens, args.hidden, args.layers = 24, 6, 8, 64, 2
    initial_threads = torch.get_num_threads()
    threads = args.threads or initial_threads
    server_threads = args.server_threads or threads
    try:
        return _run(args, argv, threads, server_threads)
    finally:
        torch.set_num_threads(initial_threads)


def _run(args, argv, threads: int, server_threads: int) -> int:
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

        torch.set_num_threads(threads)
        llm = LLM(engine_model(), tokenizer, load_entrypoints=False, max_num_seqs=args.max_num_seqs)
        lora = {name: LoRARequest(name, i + 1) for i, name in enumerate(names)}
        cpu, started = _process_cpu(), time.perf_counter()
        direct = llm.generate([p for _, p in jobs], params, [lora[a] for a, _ in jobs], use_tqdm=False)
        direct_s, direct_cpu = time.perf_counter() - started, _process_cpu() - cpu
        direct_steps = llm.engine.stats().steps

        closed_steps_seen = _Steps()
        engine = multilora_plugin.Engine(engine_model(), tokenizer, load_entrypoints=False,
                                         max_num_seqs=args.max_num_seqs, plugins=[closed_steps_seen])
        cpu, started = _process_cpu(), time.perf_counter()
        closed = _closed_loop(engine, jobs, args.clients, params)
        closed_s, closed_cpu = time.perf_counter() - started, _process_cpu() - cpu
        closed_steps = engine.stats().steps
        engine.close()

        torch.set_num_threads(server_threads)
        http = _serve(args, base, tokenizer, paths, jobs, server_threads, root)
        texts, ttft, http_s = http["texts"], http["ttft"], http["wall"]
        torch.set_num_threads(threads)
        differ = [i for i, (t, c, d) in enumerate(zip(texts, closed, direct)) if t != d.outputs[0].text or c != t]
        unexplained = [i for i in differ
                       if not _near_tie(llm, jobs[i], lora, args.new_tokens, {direct[i].outputs[0].text, closed[i],
                                                                              texts[i]})]

    tokens = args.requests * args.new_tokens
    ttft.sort()
    where = "in the server's process" if args.in_process_clients else "in their own process"
    print(f"$ python benchmarks/bench_server.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{args.requests} requests x {args.new_tokens} tokens over {args.adapters} adapters, max_loras="
          f"{args.max_loras}, max_num_seqs={args.max_num_seqs}, Llama hidden {args.hidden} x {args.layers} layers; "
          f"{args.clients} streaming `openai` clients {where}; torch threads: {threads} in-process, "
          f"{server_threads} served; served engine {'in its own process' if args.engine_process else 'in the server'}")
    print("| run | wall s | tokens/s | ratio | engine steps | server CPU ms / token |")
    print("|---|---|---|---|---|---|")
    print(f"| direct (`LLM.generate`) | {direct_s:.2f} | {tokens / direct_s:.0f} | 1.00 | {direct_steps} | "
          f"{direct_cpu / tokens * 1e3:.2f} |")
    print(f"| closed loop, in-process ({args.clients} clients) | {closed_s:.2f} | {tokens / closed_s:.0f} | "
          f"{direct_s / closed_s:.2f} | {closed_steps} | {closed_cpu / tokens * 1e3:.2f} |")
    print(f"| http ({args.clients} streaming clients) | {http_s:.2f} | {tokens / http_s:.0f} | {direct_s / http_s:.2f} "
          f"| {http['steps']} | {(http['server_cpu'] + http['engine_cpu']) / tokens * 1e3:.2f} |")
    print(f"http / closed loop: {closed_s / http_s:.2f}")
    print(f"closed loop: {closed_steps_seen.summary()}")
    if http["summary"]:
        print(f"http:        {http['summary']}")
    busiest = sorted(http["by_thread"].items(), key=lambda kv: -kv[1])
    print("server process CPU ms / token by thread: " + ", ".join(f"{name} {s / tokens * 1e3:.2f}"
                                                                  for name, s in busiest if s >= 0.005))
    if args.engine_process:
        print(f"engine process CPU ms / token: {http['engine_cpu'] / tokens * 1e3:.2f}")
    if http["client_cpu"] is not None:
        print(f"client process CPU ms / token: {http['client_cpu'] / tokens * 1e3:.2f}")
    print(f"HTTP time to first token: p50 {statistics.median(ttft) * 1000:.0f} ms, "
          f"p99 {ttft[int(0.99 * (len(ttft) - 1))] * 1000:.0f} ms; streamed text equal to direct and closed loop: "
          f"{len(jobs) - len(differ)}/{len(jobs)}" + (f" (the others part at a greedy near-tie: "
                                                     f"{len(differ) - len(unexplained)}, elsewhere: {len(unexplained)})"
                                                     if differ else ""))
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
