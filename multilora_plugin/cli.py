"""The `multilora` command.

    multilora demo      a tiny Llama, a tokenizer and four PEFT adapters built locally; one mixed
                        batch (three adapters and the base model), then a stream of requests over all
                        four adapters and the base model through the continuous-batching engine with
                        two slots, then the same through the HTTP server (TGI and OpenAI routes) with
                        concurrent clients; every output checked against PEFT
    multilora serve     the HTTP server (TGI- and OpenAI-compatible) for a model directory and PEFT
                        adapter directories; without --model, the demo's tiny model and adapters
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import signal
import sys
import tempfile
import time
import warnings
from typing import Optional, Sequence

import torch

from .toy import DEMO_ADAPTERS

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
    base = toy.demo_model(seed=seed)
    tokenizer = toy.demo_tokenizer()
    with tempfile.TemporaryDirectory(prefix="multilora-demo-") as root:
        paths = toy.demo_adapters(base, root)
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
        failures += _demo_server(base, tokenizer, paths, peft, new_tokens)
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


def _peft_tokens(peft, name, ids: Sequence[int], new_tokens: int) -> list:
    ids = torch.tensor([list(ids)])
    with torch.no_grad():
        out = peft[name].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new_tokens, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def _demo_server(base, tokenizer, paths, peft, new_tokens: int) -> int:
    """The HTTP server on a free local port, two slots; 12 concurrent clients over the TGI route
    (`adapter_id`) and the OpenAI chat route (`model`), every answer checked against PEFT."""
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import InferenceClient
    from tqdm.auto import tqdm

    import multilora_plugin

    model = multilora_plugin.wrap(copy.deepcopy(base), max_loras=2)
    for name, path in paths.items():
        model.register_adapter(name, path)
    engine = multilora_plugin.Engine(model, tokenizer, max_num_seqs=8)
    from .integrations.server import create_app

    with running_server(create_app(engine, served_model_name="tiny-llama")) as url:
        client = InferenceClient(base_url=url)
        print(f"\nHTTP server at {url} (TGI: POST /generate, OpenAI: POST /v1/chat/completions, GET /metrics)")
        adapters = [None] + list(DEMO_ADAPTERS)

        def tgi(i: int):
            name, prompt = adapters[i % len(adapters)], DEMO_ROWS[i % len(DEMO_ROWS)][1]
            out = client.text_generation(prompt, adapter_id=name, max_new_tokens=new_tokens, details=True)
            ids = tokenizer.encode(prompt)
            return "TGI   ", name, [t.id for t in out.details.tokens] == _peft_tokens(peft, name, ids, new_tokens), \
                out.generated_text

        def chat(i: int):
            name, prompt = adapters[i % len(adapters)], DEMO_ROWS[i % len(DEMO_ROWS)][1]
            messages = [{"role": "user", "content": prompt}]
            out = client.chat_completion(messages, model=name or "tiny-llama", max_tokens=new_tokens, temperature=0)
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
            want = tokenizer.decode(ids + _peft_tokens(peft, name, ids, new_tokens), skip_special_tokens=True)
            want = want[len(tokenizer.decode(ids, skip_special_tokens=True)):]
            return "OpenAI", name, out.choices[0].message.content == want, out.choices[0].message.content

        calls = [(tgi if i % 2 == 0 else chat, i) for i in range(12)]
        with ThreadPoolExecutor(12) as pool, tqdm(total=len(calls), desc="HTTP requests", unit="req") as progress:
            futures = [pool.submit(f, i) for f, i in calls]
            results = []
            for future in futures:
                results.append(future.result())
                progress.update(1)
        failures = 0
        for api, name, same, text in results:
            failures += not same
            print(f"  {api} adapter={str(name):5} {'matches PEFT' if same else 'DIFFERS FROM PEFT'}  {text.strip()}")
        stats = engine.stats()
        print(f"\nserver: {stats.finished} requests, {stats.generated_tokens} tokens in {stats.steps} steps, "
              f"{stats.slot_swaps} slot swaps")
    return failures


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(app):
    """Serve an ASGI app (`integrations.server.create_app(engine)`) on a free 127.0.0.1 port in a
    background thread; yields the base URL, stops the server on exit."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, name="multilora-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(args: argparse.Namespace) -> int:
    """Load the model and adapters, then serve them (uvicorn, or Ray Serve with --ray) until
    interrupted. SIGTERM (how process managers and container runtimes stop a server) ends it the way
    Ctrl-C does: uvicorn shuts down gracefully, then raises the signal it caught again, which this
    handler turns into KeyboardInterrupt, so the engine is closed and temporary files removed."""
    from .integrations.engine_args import EngineArgs

    signal.signal(signal.SIGTERM, _interrupt)
    keep = None
    try:
        engine_args = EngineArgs.from_cli_args(args)
        if engine_args.model is None:  # the demo's tiny model and adapters
            from multilora_plugin import toy

            keep = tempfile.TemporaryDirectory(prefix="multilora-serve-")
            print("no --model given: serving the demo's tiny Llama and its adapters", ", ".join(DEMO_ADAPTERS))
            engine_args.adapters = {**toy.demo_adapters(toy.demo_model(), keep.name), **engine_args.adapters}
        return _serve_ray(engine_args, args) if args.ray else _serve_local(engine_args, args)
    except KeyboardInterrupt:
        return 0
    finally:
        if keep is not None:
            keep.cleanup()
        print("multilora serve: stopped", flush=True)


def _access(args: argparse.Namespace):
    from .integrations.access import AccessPolicy

    return AccessPolicy(api_key=args.api_key or os.environ.get("MULTILORA_API_KEY") or None,
                        allow_runtime_lora_updates=args.allow_runtime_lora_updates,
                        adapter_roots=tuple(args.adapter_root), max_request_chars=args.max_request_chars)


def _serve_local(engine_args, args: argparse.Namespace) -> int:
    import uvicorn

    from .integrations.server import create_app

    print(f"loading {engine_args.model or 'the demo model'} ...")
    engine = engine_args.build()
    app = create_app(engine, served_model_name=engine_args.model_name,
                     max_concurrent_requests=args.max_concurrent_requests, access=_access(args))
    print(f"serving {engine_args.model_name!r} with {len(engine.model.adapter_cache.names())} adapters, "
          f"max_loras={engine_args.max_loras} on http://{args.host}:{args.port}")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
        print("engine closed", flush=True)
    return 0


def _serve_ray(engine_args, args: argparse.Namespace) -> int:
    """Start (or join, with --ray-address) a Ray cluster and run the Serve application on it."""
    import ray
    from ray import serve

    from .integrations.ray_serve import build_app

    ray.init(address=args.ray_address, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    access = dataclasses.asdict(_access(args))
    access.pop("max_request_bytes")
    app = build_app({**dataclasses.asdict(engine_args), "replicas": args.replicas, "replica_cpus": args.replica_cpus,
                     "replica_gpus": args.replica_gpus, "max_concurrent_requests": args.max_concurrent_requests,
                     **access, "adapter_roots": list(access["adapter_roots"])})
    serve.run(app, name="multilora", route_prefix="/")
    print(f"serving {engine_args.model_name!r} on {args.replicas} Ray Serve replica(s) at "
          f"http://{args.host}:{args.port} (Ctrl-C stops)")
    try:  # until Ctrl-C or SIGTERM (see `serve`)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .integrations.engine_args import EngineArgs

    parser = argparse.ArgumentParser(prog="multilora", description="Serve many LoRA adapters on one model.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run one mixed-adapter batch on a tiny local model and check it against PEFT")
    demo.add_argument("--new-tokens", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    server = commands.add_parser("serve", help="serve a model and its adapters over HTTP (TGI and OpenAI APIs)")
    EngineArgs.add_cli_args(server)
    server.add_argument("--max-concurrent-requests", type=int, default=256,
                        help="requests queued or running before new ones get 503")
    server.add_argument("--ray", action="store_true", help="serve on Ray Serve: --replicas engines, requests "
                        "routed to the replica that holds their adapter")
    server.add_argument("--replicas", type=int, default=1, help="with --ray: engine replicas")
    server.add_argument("--ray-address", default=None, help="with --ray: a running cluster (default: start one here)")
    server.add_argument("--replica-cpus", type=float, default=1.0, help="with --ray: CPUs reserved per replica")
    server.add_argument("--replica-gpus", type=float, default=None,
                        help="with --ray: GPUs per replica (default: 1 when the device is cuda)")
    server.add_argument("--allow-runtime-lora-updates", action="store_true",
                        help="let clients load adapters (/v1/load_lora_adapter, load_inplace to replace) and unload "
                             "the ones they loaded; off by default")
    server.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                        help="with --allow-runtime-lora-updates: the only directories runtime loads may read "
                             "(repeatable; relative lora_path values are taken against the first)")
    server.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on every route but /health and /metrics "
                             "(default: $MULTILORA_API_KEY, else none)")
    server.add_argument("--max-request-chars", type=int, default=1_000_000,
                        help="longest prompt or chat, in characters, before it is tokenized (413 above)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(new_tokens=args.new_tokens, seed=args.seed)
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
