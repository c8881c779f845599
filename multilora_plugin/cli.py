"""The `multilora` command.

    multilora demo      a tiny Llama, a tokenizer and four PEFT adapters built locally; one mixed
                        batch (three adapters and the base model), then a stream of requests over all
                        four adapters and the base model through the continuous-batching engine with
                        two slots, then the same through the HTTP server (TGI and OpenAI routes) with
                        concurrent clients; every output checked against PEFT
    multilora serve     the HTTP server (TGI- and OpenAI-compatible) for a model directory and PEFT
                        adapter directories; without --model, the demo's tiny model and adapters
    multilora eval      lm-evaluation-harness tasks for many adapters in one run, their requests
                        mixed in the engine's batches; one table, lm-eval's JSON per adapter
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
from typing import Optional, Sequence


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(args: argparse.Namespace) -> int:
    """Load the model and adapters, then serve them (uvicorn, or Ray Serve with --ray) until
    interrupted. SIGTERM (how process managers and container runtimes stop a server) ends it the way
    Ctrl-C does: uvicorn shuts down gracefully, then raises the signal it caught again, which this
    handler turns into KeyboardInterrupt, so the engine is closed and temporary files removed."""
    from .errors import MultiLoRAError
    from .integrations.engine_args import EngineArgs

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    keep = None
    try:
        engine_args = EngineArgs.from_cli_args(args)
        if engine_args.model is None:  # the demo's tiny model and adapters
            from multilora_plugin import toy

            keep = tempfile.TemporaryDirectory(prefix="multilora-serve-")
            print("no --model given: serving the demo's tiny Llama and its adapters", ", ".join(toy.DEMO_ADAPTERS))
            engine_args.adapters = {**toy.demo_adapters(toy.demo_model(), keep.name), **engine_args.adapters}
        return _serve_ray(engine_args, args) if args.ray else _serve_local(engine_args, args)
    except KeyboardInterrupt:
        return 0
    except (MultiLoRAError, OSError, ValueError) as exc:  # a bad --model, --adapter, ...: one line, no traceback
        print(f"multilora serve: {exc}", file=sys.stderr)
        return 2
    finally:
        if keep is not None:
            keep.cleanup()
        print("multilora serve: stopped", flush=True)


def evaluate(args: argparse.Namespace) -> int:
    """`multilora eval`: every --adapter (and the base model with --base) on --tasks, in one engine."""
    from .errors import ConfigError, MultiLoRAError
    from .integrations.engine_args import check_model_path, parse_adapter

    try:
        check_model_path("--model", args.model)
        adapters = {}
        for spec in args.adapter:
            try:
                name, path = parse_adapter(spec)
            except ValueError:
                raise ConfigError(f"`--adapter` should be NAME=PATH, but got {spec!r}") from None
            if not os.path.isdir(os.path.expanduser(path)):
                raise ConfigError(f"`--adapter {name}` should be a PEFT adapter directory, but the path {path!r} "
                                  f"{'is a file' if os.path.exists(path) else 'does not exist'}")
            adapters[name] = os.path.expanduser(path)
        if args.base:
            adapters.setdefault("base", None)
        if not adapters:
            raise ConfigError("give at least one --adapter NAME=PATH (or --base for the base model alone)")
        if args.include_path is not None and not os.path.isdir(args.include_path):
            raise ConfigError(f"`--include-path` should be a directory of task configs, but got {args.include_path!r}")
        from lm_eval.tasks import TaskManager

        from .integrations.lm_eval import evaluate_adapters, results_table, write_results

        tasks = [t for t in args.tasks.split(",") if t]
        manager = TaskManager(include_path=args.include_path)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ConfigError(f"unknown lm-eval tasks {unknown} (add --include-path DIR for your own)")
        model_args = {"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size}
        if args.max_loras is not None:
            model_args["max_loras"] = args.max_loras
        if args.max_length is not None:
            model_args["max_length"] = args.max_length
        results = evaluate_adapters(args.model, adapters, tasks, manager, model_args=model_args, limit=args.limit,
                                    num_fewshot=args.num_fewshot, log_samples=args.log_samples)
    except (MultiLoRAError, OSError, ValueError) as exc:
        print(f"multilora eval: {exc}", file=sys.stderr)
        return 2
    print(results_table(results))
    if args.output_path:
        files = write_results(results, args.output_path)
        print(f"wrote {len(files)} files under {args.output_path}")
    return 0


def _access(args: argparse.Namespace):
    from .integrations.access import AccessPolicy

    return AccessPolicy(api_key=args.api_key or os.environ.get("MULTILORA_API_KEY") or None,
                        allow_runtime_lora_updates=args.allow_runtime_lora_updates,
                        adapter_roots=tuple(args.adapter_root), max_request_chars=args.max_request_chars)


def _serve_local(engine_args, args: argparse.Namespace) -> int:
    import uvicorn

    from .integrations.server import create_app

    print(f"loading {engine_args.model or 'the demo model'} ...")
    if args.engine == "transformers":
        from .integrations.cb_backend import TransformersBackend

        if engine_args.adapter_dir is not None:
            raise ValueError("--adapter-dir is not supported with --engine transformers yet; give --adapter NAME=PATH")
        model, tokenizer = engine_args.build_model()
        backend = TransformersBackend(model, tokenizer, max_concurrent_requests=args.max_concurrent_requests,
                                      max_model_len=engine_args.max_model_len, max_num_seqs=engine_args.max_num_seqs)
    elif args.engine_process:
        from .integrations.engine_process import EngineProcess
        from .integrations.restarts import RestartPolicy

        policy = RestartPolicy(max_deaths=args.max_engine_deaths, window_s=args.engine_death_window)
        backend = EngineProcess(engine_args, max_concurrent_requests=args.max_concurrent_requests,
                                log_level=args.log_level, restarts=policy,
                                on_fatal=lambda why: setattr(server, "should_exit", True))
    else:
        backend = engine_args.build()
    app = create_app(backend, served_model_name=engine_args.model_name,
                     max_concurrent_requests=args.max_concurrent_requests, access=_access(args))
    where = ("transformers' continuous batching" if args.engine == "transformers"
             else "in its own process" if args.engine_process else "in this process")
    print(f"serving {engine_args.model_name!r} with {len(app.state.server.backend.adapters())} adapters, "
          f"lora_memory={engine_args.lora_memory or 'default'}, max_loras={engine_args.max_loras or 'as fit'} "
          f"on http://{args.host}:{args.port} (engine {where})")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    try:
        server.run()
    finally:
        backend.close()
        print("engine closed", flush=True)
    fatal = getattr(backend, "fatal", None)
    if fatal:  # the engine kept dying: a supervisor should take over
        print(f"multilora serve: {fatal}", file=sys.stderr, flush=True)
        return 1
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

    from .version import __version__

    shown = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="multilora", description="Serve many LoRA adapters on one model.")
    parser.add_argument("--version", action="version", version=f"multilora_plugin {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", formatter_class=shown,
                               help="run one mixed-adapter batch on a tiny local model and check it against PEFT")
    demo.add_argument("--new-tokens", type=int, default=12, help="tokens generated per request")
    demo.add_argument("--seed", type=int, default=0, help="seed of the demo model's random weights")
    server = commands.add_parser("serve", formatter_class=shown,
                                 help="serve a model and its adapters over HTTP (TGI and OpenAI APIs)")
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
    server.add_argument("--engine", choices=("multilora", "transformers"), default="multilora",
                        help="multilora: this package's engine; transformers: transformers' own continuous batching "
                             "(paged KV cache) with mixed adapters, greedy decoding only")
    server.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="run the engine in a process of its own, so that its step loop never waits for the "
                             "event loop's share of the GIL (as vLLM's engine core); --no-engine-process keeps it "
                             "in the server's process")
    server.add_argument("--max-engine-deaths", type=int, default=3,
                        help="with the engine in its own process: a dead engine is started again with every adapter "
                             "it served, unless it died this many times within --engine-death-window seconds: then "
                             "the server exits non-zero, naming the engine's exit code and last lines (1: exit at "
                             "the first death)")
    server.add_argument("--engine-death-window", type=float, default=300.0, metavar="SECONDS",
                        help="the window --max-engine-deaths counts in")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on")
    server.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's and multilora_plugin's log level")
    evaluation = commands.add_parser("eval", formatter_class=shown,
                                     help="evaluate many adapters with lm-evaluation-harness in one run")
    evaluation.add_argument("--model", required=True, help="the base model: a directory or a hub id")
    evaluation.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                            help="a PEFT adapter directory to evaluate under NAME (repeatable)")
    evaluation.add_argument("--base", action="store_true", help="evaluate the base model too (row 'base')")
    evaluation.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    evaluation.add_argument("--include-path", default=None, help="a directory of your own lm-eval task configs")
    evaluation.add_argument("--output-path", default=None, help="write lm-eval's JSON per adapter under it")
    evaluation.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    evaluation.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    evaluation.add_argument("--batch-size", type=int, default=32, help="requests running at once in the engine")
    evaluation.add_argument("--max-loras", type=int, default=None,
                            help="adapters resident in slots at once (default: the adapters given, up to 8)")
    evaluation.add_argument("--max-length", type=int, default=None, help="lm-eval's max_length (default: the model's)")
    evaluation.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    evaluation.add_argument("--dtype", default="auto", help="the base model's dtype (auto: its config's)")
    evaluation.add_argument("--log-samples", action="store_true", help="keep every sample's request and answer")
    args = parser.parse_args(argv)
    if args.command == "eval":
        return evaluate(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(new_tokens=args.new_tokens, seed=args.seed)
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
