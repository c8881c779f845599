"""`AsyncEngine`: the engine behind an asyncio server.

One background thread runs the step loop (`Engine.step()` is blocking torch work and never runs on
the event loop); every request gets an asyncio queue that the loop fills with its outputs:

    stream = await engine.add_request(request_id, prompt, params, lora_request)   # typed errors here
    async for output in stream:          # one RequestOutput per step that moved it, the last finished
        ...
    # leaving the loop early (client gone, task cancelled) aborts the request

Calls that take the engine's lock (adding a request, loading an adapter) run in worker threads, so
the event loop never waits for a step to end. Aborts are handed to the step thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, AsyncIterator, Dict, List, Optional, Set

from .engine import Engine
from .errors import ConfigError, InvalidRequestError, OverloadedError
from .outputs import RequestOutput

logger = logging.getLogger(__name__)


class RequestStream:
    """The outputs of one request, in order. Iterating it ends after the finished output; leaving
    the iteration before that (or calling `abort()`) aborts the request."""

    def __init__(self, request_id: str, owner: "AsyncEngine") -> None:
        self.request_id = request_id
        self._owner = owner
        self._queue: "asyncio.Queue[RequestOutput | BaseException]" = asyncio.Queue()
        self.finished = False

    def put(self, item: "RequestOutput | BaseException") -> None:
        self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            if not self.finished:
                self.abort()

    async def result(self) -> RequestOutput:
        """The finished output."""
        last = None
        async for last in self:
            pass
        return last

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)


def open_stream(streams: Dict[str, "RequestStream"], request_id: str, owner, limit: int) -> "RequestStream":
    """A new stream for `request_id` in `streams` (the requests a host holds, at most `limit`);
    `OverloadedError` at the limit, `InvalidRequestError` for an id already held."""
    if len(streams) >= limit:
        raise OverloadedError(f"the server holds {len(streams)} requests, its limit (max_concurrent_requests="
                              f"{limit}); retry later")
    if request_id in streams:
        raise InvalidRequestError(f"a request with id {request_id!r} is already queued or running")
    stream = streams[request_id] = RequestStream(request_id, owner)
    return stream


class AsyncEngine:
    """An `Engine` driven by a background step thread, with asyncio streams per request.

    `max_concurrent_requests` bounds the requests queued or running at once; one more raises
    `OverloadedError` (HTTP 503) instead of queueing without limit.
    """

    def __init__(self, engine: Engine, *, max_concurrent_requests: int = 256) -> None:
        if not isinstance(engine, Engine):
            raise ConfigError(f"expected a multilora_plugin Engine, but got {type(engine).__name__}")
        if not isinstance(max_concurrent_requests, int) or max_concurrent_requests < 1:
            raise ConfigError(f"`max_concurrent_requests` should be an int >= 1, but got {max_concurrent_requests!r}")
        self.engine = engine
        self.max_concurrent_requests = max_concurrent_requests
        self._streams: Dict[str, RequestStream] = {}
        self._aborts: Set[str] = set()
        self._mutex = threading.Lock()  # guards _aborts
        self._wake = threading.Event()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.step_errors = 0  # steps that raised (each failed the requests in flight)

    # lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the step thread; outputs are delivered on the running event loop."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="multilora-step-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Abort every request and stop the step thread."""
        for stream in list(self._streams.values()):
            stream.put(OverloadedError("the server is shutting down"))
        self._streams.clear()
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.engine.abort_request(self.engine.unfinished_request_ids())

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_requests(self) -> int:
        """Requests queued or running."""
        return len(self._streams)

    # requests -------------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt=None, sampling_params=None, lora_request=None,
                          **kwargs: Any) -> RequestStream:
        """Queue a request (arguments as `Engine.add_request`) and return its stream. Raises the
        engine's typed errors, or `OverloadedError` at `max_concurrent_requests`."""
        if not self.running:
            self.start()
        stream = open_stream(self._streams, request_id, self, self.max_concurrent_requests)
        try:
            await asyncio.to_thread(self.engine.add_request, request_id, prompt, sampling_params, lora_request,
                                    **kwargs)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (from any thread); its stream ends with the engine's "abort" output."""
        with self._mutex:
            self._aborts.add(request_id)
        self._wake.set()

    async def call(self, function, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking engine or model call (loading an adapter, stats) in a worker thread."""
        return await asyncio.to_thread(function, *args, **kwargs)

    # the step thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            with self._mutex:
                aborts, self._aborts = self._aborts, set()
            if aborts:
                engine.abort_request(list(aborts))
            self._wake.clear()
            if not engine.has_unfinished_requests():
                if not self._aborts:
                    self._wake.wait()
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001 - a bug in a step: fail what runs, keep serving
                logger.exception("an engine step failed; failing the requests in flight")
                self.step_errors += 1
                failed = engine.unfinished_request_ids()
                engine.abort_request(failed)
                self._post(self._fail, (failed, exc))
                continue
            if outputs:
                self._post(self._deliver, outputs)

    def _post(self, callback, argument) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, argument)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._stopping = True

    def _deliver(self, outputs: List[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _fail(self, failure: tuple) -> None:
        request_ids, error = failure
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(error)
