"""Scale-out on Ray Serve: throughput of 2 replicas against 1, and adapter affinity across skews.

One local Ray cluster; the Serve application of `multilora serve --ray` (ingress + `LoRAReplica`s,
one CPU and one torch thread per replica) is deployed afresh for every measurement, so adapter caches
start cold.

  throughput   the engine workload of bench_engine.py (`--requests` over `--adapters` adapters, power
               popularity `--alpha`, prompts and outputs uniform in `--prompt-len` / `--output-len`,
               greedy with ignore_eos, all arriving at t = 0), sent by `--clients` concurrent HTTP
               clients (httpx, /v1/completions with prompt token ids) to 1 replica, then to 2.
               Reported: generated tokens/s (first request to last answer), mean latency, the ratio.
               Both runs must return the same tokens for every request (exit code 1 otherwise).
               `--stream`: the clients stream instead (server-sent events, one per token).
  affinity     for each popularity skew (power alpha in `--skews`; 1.0 is uniform), `--affinity-requests`
               requests over `--affinity-adapters` adapters, `--clients` at a time, to 2 replicas that
               each keep `--cpu-loras` adapters: the share of repeated requests that found their adapter
               already in memory on the replica Serve chose (`x-multilora-adapter-resident`), against
               the same trace replayed in simulation with random routing, and with sticky routing (each
               adapter always on the replica it was first placed on: what affinity alone can reach).

    python benchmarks/bench_ray.py                   # about 3 minutes on 2 cores
    python benchmarks/bench_ray.py --quick           # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import pathlib
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from typing import Dict, List

import httpx

HERE = pathlib.Path(__file__).resolve().parent


def _bench_engine():
    """bench_engine.py, for its workload."""
    spec = importlib.util.spec_from_file_location("bench_engine", HERE / "bench_engine.py")
    module = sys.modules["bench_engine"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[8, 32], metavar=("LO", "HI"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 32], metavar=("LO", "HI"))
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--stream", action="store_true", help="throughput clients stream their answers (one event per "
                   "token) instead of plain requests")
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--skews", type=float, nargs="*", default=[0.1, 0.3, 1.0], help="power alphas of the affinity "
                   "runs (none: skip them)")
    p.add_argument("--affinity-requests", type=int, default=240)
    p.add_argument("--affinity-adapters", type=int, default=24)
    p.add_argument("--cpu-loras", type=int, default=8, help="adapters each replica keeps in the affinity runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.adapters, args.clients, args.skews = 24, 4, 6, [1.0]
        args.prompt_len, args.output_len = [4, 8], [4, 8]
        args.hidden, args.layers, args.vocab, args.rank, args.max_loras = 64, 2, 128, 4, 2
        args.affinity_requests, args.affinity_adapters, args.cpu_loras = 24, 6, 2
    return args


class Cluster:
    """A local Ray cluster with Serve's proxy on a free port; `deploy` replaces the application."""

    def __init__(self) -> None:
        import ray
        from ray import serve

        self.ray, self.serve = ray, serve
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        from multilora_plugin.integrations.local import free_port

        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        self.url = f"http://127.0.0.1:{port}"

    def deploy(self, **settings) -> None:
        from multilora_plugin.integrations.ray_serve import build_app

        self.serve.run(build_app(settings), name="multilora", route_prefix="/")

    def close(self) -> None:
        self.serve.shutdown()
        self.ray.shutdown()


async def _send(url: str, jobs: List[dict], clients: int, stream: bool = False) -> List[dict]:
    """Send every job (a /v1/completions body) with `clients` concurrent clients, as plain requests or
    streamed (server-sent events); results in order."""
    results: List[dict] = [None] * len(jobs)
    queue: asyncio.Queue = asyncio.Queue()
    for i, job in enumerate(jobs):
        queue.put_nowait(i)
    started = time.perf_counter()

    async def plain(http: httpx.AsyncClient, job: dict) -> tuple:
        response = await http.post(url + "/v1/completions", json=job)
        if response.status_code != 200:
            raise RuntimeError(f"a request failed: {response.status_code} {response.text}")
        body = response.json()
        return body["choices"][0]["text"], body["usage"]["completion_tokens"], response.headers

    async def streamed(http: httpx.AsyncClient, job: dict) -> tuple:
        job = dict(job, stream=True, stream_options={"include_usage": True})
        text, tokens = [], 0
        async with http.stream("POST", url + "/v1/completions", json=job) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"a stream failed: {chunk['error']}")
                text += [c["text"] for c in chunk["choices"]]
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            return "".join(text), tokens, response.headers

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            sent = time.perf_counter()
            text, tokens, headers = await (streamed if stream else plain)(http, jobs[i])
            results[i] = {"text": text, "latency": time.perf_counter() - sent, "tokens": tokens,
                          "replica": headers.get("x-multilora-replica"),
                          "resident": headers.get("x-multilora-adapter-resident"),
                          "done": time.perf_counter() - started}

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return results


ROLES = (("LoRAReplica", "LoRAReplicas"), ("Ingress", "ingress"), ("ProxyActor", "Serve proxy"),
         ("ServeController", "Serve controller"))


def cpu_seconds() -> Dict[int, tuple]:
    """{pid: (role, user + system CPU seconds)} of this process (the clients) and Ray's processes."""
    import psutil

    seconds = {}
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            line = " ".join(process.info["cmdline"] or [])
            if process.pid == os.getpid():
                role = "clients (this process)"
            elif "ray" not in line.lower():
                continue
            else:
                role = next((name for key, name in ROLES if key in line), "Ray's other processes")
            times = process.cpu_times()
            seconds[process.pid] = (role, times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return seconds


def cpu_by_role(before: Dict[int, tuple], after: Dict[int, tuple]) -> Dict[str, float]:
    used: Dict[str, float] = {}
    for pid, (role, total) in after.items():
        used[role] = used.get(role, 0.0) + total - before.get(pid, (role, 0.0))[1]
    return dict(sorted(used.items(), key=lambda item: -item[1]))


def throughput(cluster: Cluster, model_dir: str, paths: Dict[str, str], workload, args, replicas: int) -> dict:
    cluster.deploy(model=model_dir, adapters=paths, max_loras=args.max_loras, max_lora_rank=args.rank,
                   max_num_seqs=args.max_num_seqs, served_model_name="base", replicas=replicas)
    jobs = [{"model": r.adapter or "base", "prompt": list(r.prompt_ids), "max_tokens": r.max_new_tokens,
             "temperature": 0, "ignore_eos": True} for r in workload]
    asyncio.run(_send(cluster.url, [dict(jobs[0], model="base", max_tokens=2)] * 4, 2))  # warm the path
    before, started = cpu_seconds(), time.perf_counter()
    results = asyncio.run(_send(cluster.url, jobs, args.clients, args.stream))
    wall = time.perf_counter() - started
    cpu = cpu_by_role(before, cpu_seconds())
    tokens = sum(r["tokens"] for r in results)
    return {"replicas": replicas, "tok_s": tokens / wall, "wall_s": wall, "tokens": tokens,
            "mean_latency_s": statistics.mean(r["latency"] for r in results),
            "replicas_used": len({r["replica"] for r in results}), "texts": [r["text"] for r in results],
            "cpu": cpu}


def random_routing_rate(sequence: List[str], replicas: int, capacity: int, trials: int = 400, seed: int = 0) -> float:
    """Share of repeated requests that would find their adapter in memory with random routing
    (each replica keeping its `capacity` most recently used adapters)."""
    rng = random.Random(seed)
    hits = total = 0
    for _ in range(trials):
        caches = [OrderedDict() for _ in range(replicas)]
        seen = set()
        for name in sequence:
            cache = caches[rng.randrange(replicas)]
            if name in seen:
                total += 1
                hits += name in cache
            seen.add(name)
            cache[name] = None
            cache.move_to_end(name)
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits / max(total, 1)


def sticky_routing_rate(sequence: List[str], replicas: int, capacity: int) -> float:
    """The same share if every adapter always went to one replica, chosen at its first request as the
    replica with the fewest adapters assigned (Serve's placement rule, with no load balancing)."""
    home: Dict[str, int] = {}
    caches = [OrderedDict() for _ in range(replicas)]
    hits = total = 0
    for name in sequence:
        if name not in home:
            counts = [sum(h == r for h in home.values()) for r in range(replicas)]
            home[name] = counts.index(min(counts))
        else:
            total += 1
            hits += name in caches[home[name]]
        cache = caches[home[name]]
        cache[name] = None
        cache.move_to_end(name)
        if len(cache) > capacity:
            cache.popitem(last=False)
    return hits / max(total, 1)


def affinity(cluster: Cluster, model_dir: str, paths: Dict[str, str], bench_engine, args, alpha: float) -> dict:
    cluster.deploy(model=model_dir, adapters=paths, max_loras=args.max_loras, max_lora_rank=args.rank,
                   max_cpu_loras=args.cpu_loras, max_num_seqs=args.max_num_seqs, served_model_name="base",
                   replicas=2)
    workload = bench_engine.make_workload(args.affinity_requests, args.affinity_adapters, alpha, "power", 1.0,
                                          float("inf"), (4, 8), (4, 4), args.seed + 1, args.vocab)
    jobs = [{"model": r.adapter, "prompt": list(r.prompt_ids), "max_tokens": r.max_new_tokens, "temperature": 0,
             "ignore_eos": True} for r in workload]
    resident, seen = [], set()
    for start in range(0, len(jobs), args.clients):  # `clients` at a time: a steady load, not one burst
        chunk = jobs[start:start + args.clients]
        for job, result in zip(chunk, asyncio.run(_send(cluster.url, chunk, args.clients))):
            if job["model"] in seen:
                resident.append(result["resident"] == "true")
            seen.add(job["model"])
    sequence = [job["model"] for job in jobs]
    return {"alpha": alpha, "adapters_used": len(seen), "repeated": len(resident),
            "resident_rate": sum(resident) / max(len(resident), 1),
            "random_rate": random_routing_rate(sequence, 2, args.cpu_loras, seed=args.seed),
            "sticky_rate": sticky_routing_rate(sequence, 2, args.cpu_loras)}


def main(argv=None) -> int:
    args = parse_args(argv)
    bench_engine = _bench_engine()
    from multilora_plugin import toy

    command = "python benchmarks/bench_ray.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as root:
        base = toy.tiny_model("llama", seed=args.seed, hidden_size=args.hidden, num_layers=args.layers,
                              num_heads=args.heads, intermediate_size=args.hidden * 43 // 16, vocab_size=args.vocab)
        model_dir = os.path.join(root, "model")
        base.save_pretrained(model_dir)
        toy.tiny_tokenizer(args.vocab).save_pretrained(model_dir)
        count = max(args.adapters, args.affinity_adapters)
        names = [bench_engine.adapter_name(i) for i in range(count)]
        paths = toy.make_adapters(base, os.path.join(root, "adapters"), names, r=args.rank, lora_alpha=2 * args.rank,
                                  seed=args.seed + 1)
        workload = bench_engine.make_workload(args.requests, args.adapters, args.alpha, "power", 1.0, float("inf"),
                                              args.prompt_len, args.output_len, args.seed, args.vocab)
        cluster = Cluster()
        try:
            runs = [throughput(cluster, model_dir, {n: paths[n] for n in names[:args.adapters]}, workload, args, k)
                    for k in (1, 2)]
            skews = [affinity(cluster, model_dir, {n: paths[n] for n in names[:args.affinity_adapters]},
                              bench_engine, args, alpha) for alpha in args.skews]
        finally:
            cluster.close()
    same = sum(a == b for a, b in zip(runs[0]["texts"], runs[1]["texts"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=command, tokens_equal=same, requests=len(workload),
                           runs=[{k: v for k, v in run.items() if k != "texts"} for run in runs], skews=skews),
                      f, indent=2, default=str)
    print(f"\n{command}\n")
    print(f"Throughput: {args.requests} requests over {args.adapters} adapters (power {args.alpha}), "
          f"{args.clients} {'streaming' if args.stream else 'plain'} clients, max_loras={args.max_loras}, "
          "one CPU per replica\n")
    print("| replicas | replicas used | tok/s | wall s | mean latency s |")
    print("|---:|---:|---:|---:|---:|")
    for run in runs:
        print(f"| {run['replicas']} | {run['replicas_used']} | {run['tok_s']:.1f} | {run['wall_s']:.2f} | "
              f"{run['mean_latency_s']:.2f} |")
    print(f"\n2 replicas / 1 replica: **{runs[1]['tok_s'] / runs[0]['tok_s']:.2f}×**; "
          f"tokens equal in both runs: {same}/{len(workload)}\n")
    roles = list(dict.fromkeys(role for run in runs for role in run["cpu"]))
    print("CPU seconds used during each run, by process (the machine has", os.cpu_count(), "cores):\n")
    print("| replicas | wall s | " + " | ".join(roles) + " |")
    print("|---:|---:|" + "---:|" * len(roles))
    for run in runs:
        print(f"| {run['replicas']} | {run['wall_s']:.2f} | "
              + " | ".join(f"{run['cpu'].get(role, 0.0):.2f}" for role in roles) + " |")
    print()
    if not skews:
        return 0 if same == len(workload) else 1
    print(f"Affinity: {args.affinity_requests} requests over {args.affinity_adapters} adapters, 2 replicas keeping "
          f"{args.cpu_loras} each, {args.clients} at a time\n")
    print("| power alpha | adapters used | repeated requests | adapter in memory: Serve | random routing "
          "(simulated) | sticky routing (simulated) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in skews:
        print(f"| {s['alpha']} | {s['adapters_used']} | {s['repeated']} | {s['resident_rate']:.2f} | "
              f"{s['random_rate']:.2f} | {s['sticky_rate']:.2f} |")
    return 0 if same == len(workload) else 1


if __name__ == "__main__":
    sys.exit(main())
