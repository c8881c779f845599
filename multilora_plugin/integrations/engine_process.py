"""The engine in a process of its own behind the HTTP server, as vLLM runs its engine core.

    backend = EngineProcess(EngineArgs(model="path/to/model", adapters={...}))   # ready when it returns
    app = create_app(backend)          # the same routes, bodies and errors as over an in-process engine

Why: on small models and on CPUs an engine step is mostly Python, and a second busy Python thread in
the engine's process (the event loop serving the streams) costs each step much more than its own
CPU time, through GIL hand-offs (benchmarks/bench_server.py; RESULTS.md). In a process of its own
the step loop has an interpreter to itself; the server process parses, tokenizes, frames SSE and
talks to clients. `multilora serve` runs its engine this way unless given `--no-engine-process`.

The two processes talk over one duplex pipe of pickled tuples:

    server → engine   ("add", call, request_id, text, ids, params, adapter, metadata)
                      ("abort", request_ids)
                      ("call", call, method, args)          load_adapter, unload_adapter, metrics
                      ("stop",)
    engine → server   ("ready", description) once the engine is built, or ("error", exception)
                      ("reply", call, exception or None, value)
                      ("outputs", [RequestOutput, ...])    one message per step
                      ("failed", request_ids, exception)   a step raised: those requests fail
                      ("adapters", {name: path})            the adapter catalog, after it changed

The engine process reads the pipe between steps and blocks on it only when nothing runs: the step
loop is its only thread. The server process watches the pipe from its event loop (`add_reader`).

When the engine process ends unexpectedly (killed, out of memory), the requests and calls it held fail
with 503, and a new one starts with the same `EngineArgs` (the operator's adapters) and the adapters
clients loaded since, at their last path; meanwhile `/health` and new requests answer 503 with
`Retry-After`. Too many deaths in a row (`restarts.RestartPolicy`) stop the server instead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

from prometheus_client import CollectorRegistry, Counter, generate_latest

from ..async_engine import RequestStream, open_stream
from ..errors import InvalidRequestError, MultiLoRAError, OverloadedError, UnavailableError
from ..sampling import SamplingParams
from .engine_args import EngineArgs
from .metrics import EngineMetrics
from .protocol import describe_model
from .restarts import RestartPolicy, Tee, last_lines

logger = logging.getLogger(__name__)


class EngineProcess:
    """A backend of the HTTP server (see `integrations.server`) whose engine runs in a child process,
    built there from `engine_args`. The constructor returns once the engine is built (its errors
    are raised here: a bad model path, a bad adapter). A child that dies later is replaced (see the
    module docstring); when `restarts` says to give up, `fatal` holds why and `on_fatal(fatal)` is
    called (the CLI stops the server with it)."""

    RETRY_AFTER_S = 5  # what 503s say while a new engine process starts

    def __init__(self, engine_args: EngineArgs, *, max_concurrent_requests: int = 256,
                 log_level: Optional[str] = None, start_timeout_s: float = 600.0,
                 restarts: Optional[RestartPolicy] = None, on_fatal: Optional[Callable[[str], None]] = None) -> None:
        self.engine_args = engine_args
        self.tokenizer = engine_args.load_tokenizer()
        self.default_model_name = engine_args.model_name
        self.max_concurrent_requests = max_concurrent_requests
        self.log_level, self.start_timeout_s = log_level, start_timeout_s
        self.restarts = restarts or RestartPolicy()
        self.on_fatal = on_fatal
        self.fatal: Optional[str] = None  # why the server gave up on its engine
        self._logs = tempfile.TemporaryDirectory(prefix="multilora-engine-")
        self.log_path = os.path.join(self._logs.name, "engine.log")  # the engine process's stderr, teed
        self._streams: Dict[str, RequestStream] = {}
        self._calls: Dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._gone: Optional[str] = None  # why the engine process is no longer there
        self._closing = False
        self._restart: Optional[asyncio.Task] = None  # while a new engine process starts
        self._runtime: Dict[str, str] = {}  # adapters clients loaded: loaded again into a new engine
        self._registry = CollectorRegistry()
        self._restarts_total = Counter("multilora_engine_restarts", "engine processes started again after one "
                                       "ended unexpectedly", registry=self._registry)
        self._conn, self.process = self._spawn()

    def _spawn(self) -> tuple:
        """Start an engine process and wait until it is built; returns (pipe, process)."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or CUDA state copied
        conn, child = context.Pipe(duplex=True)
        process = context.Process(target=_engine_main, args=(child, self.engine_args, self.log_level, self.log_path),
                                  name="multilora-engine", daemon=True)
        process.start()
        child.close()
        try:
            if not conn.poll(self.start_timeout_s):
                raise UnavailableError(f"the engine process did not start within {self.start_timeout_s:.0f} s")
            kind, value = conn.recv()
        except EOFError:
            process.join(5)
            raise UnavailableError(f"the engine process ended while starting (exit code {process.exitcode})") \
                from None
        except BaseException:
            process.kill()
            raise
        if kind == "error":
            process.join()
            raise value
        if self._closing:  # the server stopped while this one started
            process.kill()
            raise UnavailableError("the server is shutting down")
        self.max_model_len = value.pop("max_model_len")
        self._catalog: Dict[str, str] = value.pop("adapters")
        self._description = value
        return conn, process

    # the backend's interface (integrations.backend) ------------------------------------------------
    metrics_elsewhere = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._watch()

    def _watch(self) -> None:
        self._loop.add_reader(self._conn.fileno(), self._read)
        os.set_blocking(self._conn.fileno(), True)  # uvloop makes it non-blocking; a message is read whole

    async def stop(self) -> None:
        """Abort every request, stop the engine process (it closes its engine) and wait for it."""
        for stream in list(self._streams.values()):
            stream.put(OverloadedError("the server is shutting down"))
        self._streams.clear()
        if self._loop is not None and self._gone is None:
            self._loop.remove_reader(self._conn.fileno())
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the engine process (it closes its engine first) and wait for it; idempotent. A clean
        shutdown never restarts anything."""
        self._closing = True
        if self._restart is not None:
            self._restart.cancel()
        if self._gone is None:
            self._gone = "the server is shutting down"
            try:
                self._conn.send(("stop",))
            except (OSError, ValueError):
                pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    async def unhealthy(self) -> Optional[str]:
        if self._gone is None and not self.process.is_alive():
            self._lost(f"the engine process ended (exit code {self.process.exitcode})")
        return self._gone if self._restart is None else "a new engine process is starting"

    def _unavailable(self) -> UnavailableError:
        if self._restart is None:
            return UnavailableError(self._gone)
        error = UnavailableError("the engine process ended and a new one is starting; retry shortly")
        error.retry_after_s = self.RETRY_AFTER_S  # the server's 503 says so in `Retry-After`
        return error

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def adapters(self) -> Dict[str, str]:
        return dict(self._catalog)

    def describe(self) -> dict:
        return dict(self._description)

    async def submit(self, request_id: str, text: Optional[str], ids: List[int], params: SamplingParams,
                     adapter: Optional[str], metadata: Dict[str, Any], stream: bool = True) -> RequestStream:
        handle = open_stream(self._streams, request_id, self, self.max_concurrent_requests)
        try:
            await self._call("add", request_id, text, ids, params, adapter, metadata)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return handle

    def abort(self, request_id: str) -> None:
        """Called by a stream that its reader left: the engine aborts it and reports the abort."""
        if self._gone is None:
            try:
                self._send(("abort", [request_id]))
            except UnavailableError:
                pass  # nothing left to abort

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> None:
        await self._call("call", "load_adapter", (name, path, replace))
        self._runtime[name] = path

    async def unload_adapter(self, name: str) -> None:
        await self._call("call", "unload_adapter", (name,))
        self._runtime.pop(name, None)

    async def render_metrics(self) -> bytes:
        ours = generate_latest(self._registry)
        if self._gone is not None or self._restart is not None:  # only the server's own while no engine runs
            return ours
        return await self._call("call", "metrics", (len(self._streams),)) + ours

    # the pipe ----------------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError) as exc:  # the engine process is gone
            self._lost(f"the engine process is gone ({exc})")
            raise UnavailableError(self._gone) from None

    async def _call(self, kind: str, *args: Any, replay: bool = False) -> Any:
        if self._gone is not None or (self._restart is not None and not replay):
            raise self._unavailable()
        call = next(self._ids)
        future = self._calls[call] = self._loop.create_future()
        try:
            self._send((kind, call, *args))
            return await future
        finally:
            self._calls.pop(call, None)

    def _read(self) -> None:
        """Everything the engine process sent so far (run by the event loop when the pipe is readable)."""
        try:
            while self._conn.poll():
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            self.process.join(1)
            self._lost(f"the engine process ended (exit code {self.process.exitcode})")

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            for output in message[1]:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    stream.put(output)
                    if output.finished:
                        del self._streams[output.request_id]
        elif kind == "reply":
            _, call, error, value = message
            future = self._calls.get(call)
            if future is not None and not future.done():
                future.set_exception(error) if error is not None else future.set_result(value)
        elif kind == "failed":
            _, request_ids, error = message
            for request_id in request_ids:
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    stream.put(error)
        elif kind == "adapters":
            self._catalog = message[1]

    def _lost(self, why: str) -> None:
        """The engine process is gone: every request and call it held fails with 503, then a new one
        starts (unless the server is shutting down, or this death is one too many)."""
        if self._gone is not None:
            return
        self._gone = why
        logger.error("%s; failing the %d requests it held", why, len(self._streams))
        for stream in self._streams.values():
            stream.put(UnavailableError(f"{why}; the request was lost"))
        self._streams.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(UnavailableError(why))
        if self._closing or self._loop is None:
            return
        if self.restarts.died(time.monotonic()):
            self._give_up(why)
        else:
            self._restart = self._loop.create_task(self._start_again(why))

    async def _start_again(self, why: str) -> None:
        """A new engine process with the same arguments, then the adapters clients had loaded."""
        started = time.monotonic()
        try:
            self._loop.remove_reader(self._conn.fileno())
        except (OSError, ValueError):
            pass
        self._conn.close()
        logger.warning("%s: starting a new engine process", why)
        while True:
            try:
                conn, process = await asyncio.to_thread(self._spawn)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a start that fails is one more death
                cause = f"a new engine process failed to start: {type(exc).__name__}: {exc}"
                if self._closing:
                    return
                if self.restarts.died(time.monotonic()):
                    self._restart = None
                    self._give_up(cause)
                    return
                logger.error("%s; trying again", cause)
        if self._closing:
            process.kill()
            return
        self._conn, self.process, self._gone = conn, process, None
        self._watch()
        for name, path in list(self._runtime.items()):
            try:
                await self._call("call", "load_adapter", (name, path, False), replay=True)
            except UnavailableError:  # this one died too: another restart takes over
                return
            except MultiLoRAError as exc:
                logger.error("adapter %r (loaded at run time from %s) could not be loaded again: %s", name, path, exc)
                self._runtime.pop(name)
        self._restart = None
        self._restarts_total.inc()
        logger.warning("a new engine process serves again %.1f s after the last one ended, with %d adapters",
                       time.monotonic() - started, len(self._catalog))

    def _give_up(self, cause: str) -> None:
        """Too many deaths: no more restarts; `fatal` says why, `on_fatal` stops the server."""
        policy = self.restarts
        tail = last_lines(self.log_path)
        self.fatal = (f"{cause}; the engine process died {policy.recent_deaths} times within {policy.window_s:g} s "
                      f"(at most {policy.max_deaths}), so the server stops"
                      + (f". The engine's last lines:\n{tail}" if tail else ""))
        self._gone = "the engine process keeps dying; the server is stopping"
        logger.critical("%s", self.fatal)
        if self.on_fatal is not None:
            self.on_fatal(self.fatal)


# the engine process ----------------------------------------------------------------------------------
def _engine_main(conn, engine_args: EngineArgs, log_level: Optional[str], log_path: Optional[str] = None) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops this process
    if log_path is not None:  # what it says on stderr also goes to a file the server reads if it gives up
        sys.stderr = Tee(sys.stderr, open(log_path, "a", buffering=1))
    if log_level is not None:
        logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = engine_args.build()
    except BaseException as exc:  # noqa: BLE001 - reported to the server process, which raises it
        conn.send(("error", _portable(exc)))
        return
    core = _Core(engine, conn)
    try:
        core.run()
    finally:
        engine.close()


class _Core:
    """The engine process's loop: commands from the pipe between steps, one outputs message per step."""

    def __init__(self, engine, conn) -> None:
        self.engine = engine
        self.conn = conn
        self.in_flight = 0  # as the server counts its streams, for /metrics
        self.metrics = EngineMetrics(engine, in_flight=lambda: self.in_flight)
        self.catalog_changed = False
        engine.cache.listeners.append(self._on_adapter_event)
        conn.send(("ready", {"max_model_len": engine.max_model_len, "adapters": self._catalog(),
                             **describe_model(engine.model)}))

    def run(self) -> None:
        engine, conn = self.engine, self.conn
        while True:
            idle = not engine.has_unfinished_requests()
            while conn.poll(None if idle else 0):  # block only when nothing runs
                if not self._handle(conn.recv()):
                    return
                idle = False
            if engine.has_unfinished_requests():
                self._step()
            if self.catalog_changed:
                self.catalog_changed = False
                conn.send(("adapters", self._catalog()))

    def _handle(self, message: tuple) -> bool:
        kind = message[0]
        if kind == "stop":
            return False
        if kind == "abort":
            self.engine.abort_request(message[1])
            return True
        call, error, value = message[1], None, None
        try:
            if kind == "add":
                request_id, text, ids, params, adapter, metadata = message[2:]
                self.engine.add_request(request_id, text, params, adapter, prompt_token_ids=ids, metadata=metadata)
            else:
                value = self._method(*message[2:])
        except Exception as exc:  # noqa: BLE001 - the caller's error, raised in the server process
            error = _portable(exc)
        self.conn.send(("reply", call, error, value))
        return True

    def _method(self, name: str, args: tuple) -> Any:
        model = self.engine.model
        if name == "load_adapter":
            adapter, path, replace = args
            model.load_adapter(adapter, path, replace=replace)
        elif name == "unload_adapter":
            model.unload_adapter(*args)
        elif name == "metrics":
            (self.in_flight,) = args
            return self.metrics.render()
        else:
            raise InvalidRequestError(f"the engine process has no method {name!r}")
        return None

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a bug in a step: fail what runs, keep serving
            logger.exception("an engine step failed; failing the requests in flight")
            failed = self.engine.unfinished_request_ids()
            self.engine.abort_request(failed)  # their abort outputs go to streams that are gone
            self.conn.send(("failed", failed, _portable(exc)))
            return
        if outputs:
            for output in outputs:
                if output.error is not None:
                    output.error = _portable(output.error)
            self.conn.send(("outputs", outputs))

    def _catalog(self) -> Dict[str, str]:
        return self.engine.cache.paths()

    def _on_adapter_event(self, event) -> None:
        if event.old is None or event.new is None:  # registered or unloaded
            self.catalog_changed = True


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a `MultiLoRAError` that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return MultiLoRAError(f"{type(exc).__name__}: {exc}")
