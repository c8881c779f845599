"""The HTTP server: TGI- and OpenAI-compatible routes over one engine (FastAPI).

    app = create_app(engine)            # engine = multilora_plugin.Engine(wrap(model), tokenizer)
    uvicorn.run(app, port=8000)         # or: multilora serve --model PATH --adapter NAME=PATH ...

The routes reach the engine through a backend: `EngineBackend` for an engine in this process;
`integrations.ray_serve` serves the same app over engine replicas on Ray Serve.

Routes
    TGI / LoRAX   POST /generate, POST /generate_stream (server-sent events), POST / (either, by
                  `stream`), GET /info, GET /health; `parameters.adapter_id` picks the adapter
    OpenAI        GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true`:
                  server-sent events ending in `[DONE]`), POST /v1/load_lora_adapter,
                  POST /v1/unload_lora_adapter; `model` names the adapter or the base model
    Prometheus    GET /metrics

Errors come in each API's own format (TGI: `{"error", "error_type"}`; OpenAI: `{"error": {"message",
"type", "param", "code"}}`) with the status of their kind: 400 bad parameters or adapter files,
401 no API key, 403 not allowed by the operator (`integrations.access`), 404 unknown adapter or route,
405 wrong method, 413 too large, 422 a body that does not match the schema, 503 when
`max_concurrent_requests` requests are already held. A client that goes away aborts its request: its queue entry, slot
reference and KV rows are freed at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from .. import __version__
from ..async_engine import AsyncEngine, RequestStream
from ..engine import Engine
from ..errors import (
    AdapterExistsError,
    AdapterLoadError,
    AdapterNotFoundError,
    ConfigError,
    IncompatibleAdapterError,
    InvalidRequestError,
    MultiLoRAError,
    OverloadedError,
    RequestRejected,
    UnavailableError,
)
from ..outputs import RequestOutput
from ..sampling import SamplingParams
from ..model import BASE_MODEL
from . import protocol
from .access import AccessPolicy, Forbidden, Gate, RequestTooLarge, Unauthorized
from .metrics import EngineMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRARequest,
    TGIRequest,
    Tokens,
    UnloadLoRARequest,
)

MAX_CHOICES = 64  # prompts × n of one OpenAI request

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 422: "invalid_request_error", 500: "server_error", 503: "server_overloaded"}
# huggingface_hub maps TGI's error types to typed errors: "validation" → ValidationError, ...
_TGI_TYPES = {400: "validation", 401: "validation", 403: "validation", 404: "validation", 405: "validation",
              413: "validation", 422: "validation", 500: "generation", 503: "overloaded"}


def status_of(error: BaseException) -> int:
    """The HTTP status of an error: what the client can fix is 4xx."""
    if isinstance(error, (OverloadedError, UnavailableError)):
        return 503
    if isinstance(error, Unauthorized):
        return 401
    if isinstance(error, Forbidden):
        return 403
    if isinstance(error, RequestTooLarge):
        return 413
    if isinstance(error, protocol.UnsupportedOption):
        return 422
    if isinstance(error, AdapterNotFoundError):
        return 404
    if isinstance(error, (InvalidRequestError, RequestRejected, AdapterExistsError, AdapterLoadError,
                          IncompatibleAdapterError, ConfigError)):
        return 400
    return 500


def error_body(path: str, status: int, message: str) -> dict:
    """The error in the format of the API that `path` belongs to."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # any text a client sent, made safe
    if path.startswith("/v1/"):
        code = "model_not_found" if status == 404 else status
        return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"), "param": None,
                          "code": code}}
    return {"error": message, "error_type": _TGI_TYPES.get(status, "generation")}


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class EngineBackend:
    """The routes' view of one engine in this process (`integrations.ray_serve` has another: replicas
    behind Ray Serve). A backend queues requests and returns their streams, names and loads adapters,
    and describes the model."""

    def __init__(self, engine: Engine, *, max_concurrent_requests: int = 256) -> None:
        if not isinstance(engine, Engine):
            raise ConfigError(f"expected a multilora_plugin Engine, but got {type(engine).__name__}")
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.async_engine = AsyncEngine(engine, max_concurrent_requests=max_concurrent_requests)
        self.metrics = EngineMetrics(engine, in_flight=lambda: self.async_engine.num_requests)
        self.default_model_name = model_name(engine.model)

    @property
    def max_concurrent_requests(self) -> int:
        return self.async_engine.max_concurrent_requests

    async def start(self) -> None:
        self.async_engine.start()

    async def stop(self) -> None:
        await self.async_engine.stop()

    async def unhealthy(self) -> Optional[str]:
        """Why the backend cannot serve now, or None."""
        return None if self.async_engine.running else "the engine's step loop is not running"

    async def submit(self, request_id: str, text: Optional[str], ids: List[int], params: SamplingParams,
                     adapter: Optional[str], metadata: Dict[str, Any], stream: bool = True) -> RequestStream:
        """Queue one request; raises the engine's typed errors before returning its stream (which,
        with `stream=False`, need only deliver the finished output)."""
        return await self.async_engine.add_request(request_id, text, params, adapter, prompt_token_ids=ids,
                                                   metadata=metadata)

    def adapters(self) -> Dict[str, str]:
        """Adapter name → its directory, for every adapter that can be named."""
        cache = self.model.adapter_cache
        return {name: cache.source(name).path for name in cache.names()}

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> None:
        await self.async_engine.call(self.model.load_adapter, name, path, replace=replace)

    async def unload_adapter(self, name: str) -> None:
        await self.async_engine.call(self.model.unload_adapter, name)

    def describe(self) -> dict:
        return describe_model(self.model)

    async def render_metrics(self) -> bytes:
        return await self.async_engine.call(self.metrics.render)


class Server:
    """The state behind one app: a backend (an engine here, or replicas elsewhere), the tokenizer
    and the served names."""

    def __init__(self, backend, *, served_model_name: Optional[str] = None,
                 access: Optional[AccessPolicy] = None) -> None:
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.tokens = Tokens(self.tokenizer)
        self.model_name = served_model_name or backend.default_model_name
        self.access = access or AccessPolicy()
        self.operator_adapters = frozenset(backend.adapters())  # loaded at startup: not the clients' to change

    # requests -------------------------------------------------------------------------------------
    async def encode(self, text: str, *, special: bool = True) -> List[int]:
        """Token ids of a prompt, its size checked first; tokenized off the event loop."""
        if self.tokenizer is None:
            raise InvalidRequestError("this server has no tokenizer: text prompts cannot be served")
        self.access.check_chars(text)
        try:
            return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=special)
        except Exception as exc:  # noqa: BLE001 - text the tokenizer refuses is the client's to fix
            raise InvalidRequestError(f"the tokenizer cannot encode this prompt: {type(exc).__name__}: {exc}") from None

    async def chat_prompt(self, conversation: List[dict]) -> str:
        self.access.check_chars("".join(m["content"] for m in conversation), "the messages")
        return await asyncio.to_thread(_chat_prompt, self.tokenizer, conversation)

    def room(self, ids: Sequence[int]) -> Optional[int]:
        """Positions left after a prompt."""
        limit = self.backend.max_model_len
        return None if limit is None else limit - len(ids)

    def adapter_of(self, model: str) -> Optional[str]:
        """The adapter an OpenAI `model` names (None: the base model)."""
        return None if model in (self.model_name, BASE_MODEL) else model

    async def submit(self, jobs: Sequence[Tuple[Optional[str], List[int], SamplingParams]], adapter: Optional[str],
                     metadata: Dict[str, Any], prefix: str, stream: bool = True) -> list:
        """Queue one request per (text, ids, params); all or none. `stream=False`: only the finished
        outputs will be read."""
        streams = []
        try:
            for i, (text, ids, params) in enumerate(jobs):
                request_id = prefix if len(jobs) == 1 else f"{prefix}-{i}"
                streams.append(await self.backend.submit(request_id, text, ids, params, adapter, metadata, stream))
        except BaseException:
            for stream in streams:
                stream.abort()
            raise
        return streams

    # the routes' shared parts ----------------------------------------------------------------------
    async def finished(self, streams: list, request: Request) -> List[RequestOutput]:
        """The finished output of every stream; aborts them all if the client goes away."""
        watcher = asyncio.ensure_future(_watch_disconnect(request, streams))
        try:
            outputs = [None] * len(streams)
            async for index, output in merged(streams):
                outputs[index] = output
            for output in outputs:
                _raise_failure(output)
            return outputs
        finally:
            watcher.cancel()

    def info(self) -> dict:
        limit = self.backend.max_model_len
        return {
            "model_id": self.model_name, "model_sha": None, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": self.backend.max_concurrent_requests,
            "max_best_of": 1, "max_stop_sequences": protocol.MAX_STOP_SEQUENCES,
            "max_input_tokens": limit - 1 if limit else None, "max_total_tokens": limit, "max_client_batch_size": MAX_CHOICES,
            "validation_workers": 1, "router": "multilora_plugin", "version": __version__, "sha": None,
            "docker_label": None, "adapters": sorted(self.backend.adapters()), **self.backend.describe(),
        }


def describe_model(model) -> dict:
    """A wrapped model's part of TGI's /info."""
    first = next(model.parameters(), None)
    return {"model_dtype": str(first.dtype).replace("torch.", "") if first is not None else None,
            "model_device_type": first.device.type if first is not None else None,
            "max_loras": model.multilora_config.max_loras, "max_lora_rank": model.multilora_config.max_lora_rank,
            "model_type": getattr(model.config, "model_type", None)}


def model_name(model) -> str:
    """The base model's name in the OpenAI API, unless the operator gives one."""
    name = getattr(model.config, "_name_or_path", "") or ""
    return name or getattr(model.config, "model_type", None) or "base"


async def _watch_disconnect(request: Request, streams: List[RequestStream]) -> None:
    while True:
        await asyncio.sleep(0.2)
        if await request.is_disconnected():
            for stream in streams:
                stream.abort()
            return


async def merged(streams: List[RequestStream]) -> AsyncIterator[Tuple[int, RequestOutput]]:
    """(index, output) from several streams as they come; leaving early aborts them all."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as exc:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


def _raise_failure(output: RequestOutput) -> None:
    """A request that ended in error raises it (typed errors keep their status)."""
    if output.outputs[0].finish_reason != "error":
        return
    error = output.error
    if isinstance(error, MultiLoRAError):
        raise error
    raise GenerationFailed(f"request {output.request_id} failed: {type(error).__name__}: {error}")


class GenerationFailed(MultiLoRAError, RuntimeError):
    """The model failed while generating a request (HTTP 500)."""


def create_app(engine, *, served_model_name: Optional[str] = None, max_concurrent_requests: int = 256,
               access: Optional[AccessPolicy] = None) -> FastAPI:
    """A FastAPI app serving `engine` (see the module docstring): an `Engine`, or a backend such as
    `EngineBackend` (`max_concurrent_requests` is then the backend's own). The engine's step loop
    starts with the app and stops with it; `app.state.server` is the `Server`. `access` says what
    clients may do (`integrations.access`: API key, runtime adapter updates, adapter roots, sizes);
    by default runtime adapter updates are off and no key is asked."""
    backend = EngineBackend(engine, max_concurrent_requests=max_concurrent_requests) \
        if isinstance(engine, Engine) else engine
    server = Server(backend, served_model_name=served_model_name, access=access)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    app = FastAPI(title="multilora_plugin", version=__version__, lifespan=lifespan,
                  description="Many LoRA adapters on one model: TGI- and OpenAI-compatible routes.")
    app.state.server = server
    app.add_middleware(Gate, policy=server.access, error_body=error_body)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:  # unknown route, wrong method, ...
        return JSONResponse(error_body(request.url.path, exc.status_code, str(exc.detail)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(MultiLoRAError)
    async def on_error(request: Request, exc: MultiLoRAError) -> JSONResponse:
        status = status_of(exc)
        message = str(exc).replace("; give its lora_path to register it", "")  # a Python hint, not an HTTP one
        return JSONResponse(error_body(request.url.path, status, message), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(error_body(request.url.path, 422, f"invalid request body: {problems}"), status_code=422)

    # TGI ------------------------------------------------------------------------------------------
    async def tgi(body: TGIRequest, request: Request, stream: bool, as_list: bool = False) -> Response:
        p = body.parameters
        ids = await server.encode(body.inputs)
        if p.truncate is not None:
            ids = ids[-p.truncate:]
        params = protocol.tgi_sampling(p, server.room(ids), token_details=stream or p.details)
        streams = await server.submit([(body.inputs, ids, params)], p.adapter_id,
                                      {"api": "tgi", "route": request.url.path}, f"tgi-{uuid.uuid4().hex}", stream)
        headers = _headers(streams)
        if not stream:
            (output,) = await server.finished(streams, request)
            answer = protocol.tgi_response(output, params, p, server.tokens)
            return JSONResponse([answer] if as_list else answer, headers=headers)

        async def events() -> AsyncIterator[str]:
            try:
                async for _, output in merged(streams):
                    _raise_failure(output)
                    for event in protocol.tgi_stream_events(output, params, p, server.tokens):
                        yield _sse(event)
            except MultiLoRAError as exc:
                yield _sse(error_body(request.url.path, status_of(exc), str(exc)))

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/generate", tags=["TGI"])
    async def generate(body: TGIRequest, request: Request) -> Response:
        """Generate text (TGI). `parameters.adapter_id` names the adapter."""
        return await tgi(body, request, stream=False)

    @app.post("/generate_stream", tags=["TGI"])
    async def generate_stream(body: TGIRequest, request: Request) -> Response:
        """Generate text as server-sent events, one per token (TGI)."""
        return await tgi(body, request, stream=True)

    @app.post("/", tags=["TGI"])
    async def compat_generate(body: TGIRequest, request: Request) -> Response:
        """TGI's compatibility route (used by `huggingface_hub.InferenceClient`): `stream` chooses."""
        return await tgi(body, request, stream=body.stream, as_list=True)

    @app.get("/info", tags=["TGI"])
    async def info() -> dict:
        return server.info()

    @app.get("/health", tags=["TGI"])
    async def health() -> Response:
        problem = await backend.unhealthy()
        if problem is None:
            return Response(status_code=200)
        return JSONResponse(error_body("/health", 503, problem), status_code=503)

    # OpenAI ---------------------------------------------------------------------------------------
    @app.get("/v1/models", tags=["OpenAI"])
    async def models() -> dict:
        created = protocol.now()
        cards = [{"id": server.model_name, "object": "model", "created": created, "owned_by": "multilora_plugin",
                  "root": server.model_name, "parent": None}]
        for name, path in sorted(backend.adapters().items()):
            cards.append({"id": name, "object": "model", "created": created, "owned_by": "multilora_plugin",
                          "root": path, "parent": server.model_name})
        return {"object": "list", "data": cards}

    async def openai(body, request: Request, jobs, kind: str) -> Response:
        """Shared by completions and chat completions: `jobs` are (text, ids, params), one per choice."""
        if len(jobs) > MAX_CHOICES:
            raise InvalidRequestError(f"one request may ask for at most {MAX_CHOICES} choices (prompts × n), "
                                      f"but this one asks for {len(jobs)}")
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        metadata = {"api": "openai", "route": request.url.path, "user": body.user}
        streams = await server.submit(jobs, server.adapter_of(body.model), metadata, request_id, body.stream)
        headers = _headers(streams)
        created, echo = protocol.now(), getattr(body, "echo", False)
        k = (body.top_logprobs or 0) if kind == "chat" else (body.logprobs or 0)
        if not body.stream:
            outputs = await server.finished(streams, request)
            choices = [_choice(kind, i, out, server.tokens, k, echo) for i, out in enumerate(outputs)]
            prompt_tokens = sum(len(out.prompt_token_ids) for out in outputs[::body.n])
            completion_tokens = sum(len(out.outputs[0].token_ids) for out in outputs)
            return JSONResponse({"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
                                 "created": created, "model": body.model, "choices": choices,
                                 "usage": protocol.usage(prompt_tokens, completion_tokens)}, headers=headers)

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        async def events() -> AsyncIterator[str]:
            started, counts = set(), {}
            prompt_tokens = 0
            try:
                async for index, output in merged(streams):
                    _raise_failure(output)
                    choice = _delta(kind, index, output, server.tokens, k, echo and index not in started,
                                    first=index not in started)
                    if index not in started:
                        started.add(index)
                        prompt_tokens += len(output.prompt_token_ids) if index % body.n == 0 else 0
                    counts[index] = len(output.outputs[0].token_ids)
                    chunk = {"id": request_id, "object": obj, "created": created, "model": body.model,
                             "choices": [choice]}
                    if include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
                if include_usage:
                    yield _sse({"id": request_id, "object": obj, "created": created, "model": body.model,
                                "choices": [], "usage": protocol.usage(prompt_tokens, sum(counts.values()))})
            except MultiLoRAError as exc:
                yield _sse(error_body(request.url.path, status_of(exc), str(exc)))
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/completions", tags=["OpenAI"])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completions; `model` is an adapter name or the base model's."""
        prompts = body.prompts()
        jobs = []
        for prompt in prompts:
            text, ids = (prompt, await server.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
            params = body.params(server.room(ids))
            jobs += [(text, ids, _nth(params, i)) for i in range(body.n)]
        return await openai(body, request, jobs, "completion")

    @app.post("/v1/chat/completions", tags=["OpenAI"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completions with the tokenizer's chat template; `model` as for completions."""
        text = await server.chat_prompt(body.conversation())
        ids = await server.encode(text, special=False)
        params = body.params(server.room(ids))
        return await openai(body, request, [(text, ids, _nth(params, i)) for i in range(body.n)], "chat")

    @app.post("/v1/load_lora_adapter", tags=["OpenAI"])
    async def load_lora_adapter(body: LoadLoRARequest) -> Response:
        """Load a PEFT adapter directory (as vLLM does); it can be used as `model` right away. With
        `load_inplace: true`, an adapter of that name gets the new files: requests running with it
        finish on the old weights, later ones use the new. Off unless the server allows runtime updates."""
        name, policy = body.lora_name, server.access
        policy.check_updates("/v1/load_lora_adapter")
        policy.check_name(name, server.model_name)
        path = policy.adapter_path(body.lora_path)
        exists = name in backend.adapters()
        if exists and not body.load_inplace:
            raise AdapterExistsError(f"an adapter named {name!r} is already loaded; send `load_inplace: true` to "
                                     "replace it, or use another `lora_name`")
        if exists and name in server.operator_adapters:
            raise Forbidden(f"adapter {name!r} was loaded by the operator when the server started; clients "
                            "cannot replace it")
        await backend.load_adapter(name, path, replace=exists)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' {'replaced' if exists else 'added'} successfully.")

    @app.post("/v1/unload_lora_adapter", tags=["OpenAI"])
    async def unload_lora_adapter(body: UnloadLoRARequest) -> Response:
        """Forget an adapter loaded at runtime; requests already running with it finish first."""
        server.access.check_updates("/v1/unload_lora_adapter")
        if body.lora_name in server.operator_adapters:
            raise Forbidden(f"adapter {body.lora_name!r} was loaded by the operator when the server started; "
                            "clients cannot unload it")
        await backend.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # Prometheus -----------------------------------------------------------------------------------
    @app.get("/metrics", tags=["metrics"])
    async def metrics() -> Response:
        text = await backend.render_metrics()
        if text is None:
            return JSONResponse(error_body("/metrics", 404, backend.metrics_elsewhere), status_code=404)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app


def _headers(streams: list) -> Dict[str, str]:
    """Response headers a backend's streams report (Ray Serve: the replicas that serve them),
    comma-joined over the streams of one request."""
    joined: Dict[str, List[str]] = {}
    for stream in streams:
        for key, value in getattr(stream, "headers", {}).items():
            joined.setdefault(key, []).append(value)
    return {key: ",".join(values) for key, values in joined.items()}


def _nth(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of `n` choices: its own seed, so seeded choices differ from each other."""
    if i == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + i) % 2**64)


def _chat_prompt(tokenizer, conversation: List[dict]) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this server's tokenizer has no chat template; use /v1/completions")
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - the template refuses these messages (e.g. raise_exception)
        raise InvalidRequestError(f"the chat template cannot render these messages: {exc}") from None


def _echo(output: RequestOutput, tokens: Tokens) -> str:
    """The prompt as `echo` repeats it: its text, or its ids decoded."""
    if output.prompt is not None or tokens.tokenizer is None:
        return output.prompt or ""
    return tokens.tokenizer.decode(output.prompt_token_ids)


def _choice(kind: str, index: int, output: RequestOutput, tokens: Tokens, k: int, echo: bool) -> dict:
    completion = output.outputs[0]
    reason = protocol.openai_finish_reason(completion)
    if kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "logprobs": protocol.chat_logprobs(completion, 0, tokens, k), "finish_reason": reason}
    prefix = _echo(output, tokens) if echo else ""
    return {"index": index, "text": prefix + completion.text,
            "logprobs": protocol.completion_logprobs(completion, output.prompt_token_ids, 0, tokens, len(prefix), k),
            "finish_reason": reason}


def _delta(kind: str, index: int, output: RequestOutput, tokens: Tokens, k: int, echo: bool, first: bool) -> dict:
    completion = output.outputs[0]
    start = len(completion.token_ids) - len(completion.delta_token_ids)
    reason = protocol.openai_finish_reason(completion)
    if kind == "chat":
        delta: Dict[str, Any] = {"role": "assistant"} if first else {}
        if completion.delta_text or first:
            delta["content"] = completion.delta_text
        return {"index": index, "delta": delta, "logprobs": protocol.chat_logprobs(completion, start, tokens, k),
                "finish_reason": reason}
    prefix = _echo(output, tokens) if echo else ""
    return {"index": index, "text": prefix + completion.delta_text,
            "logprobs": protocol.completion_logprobs(completion, output.prompt_token_ids + completion.token_ids[:start],
                                                     start, tokens, 0, k),
            "finish_reason": reason}


__all__ = ["create_app", "EngineBackend", "Server", "status_of", "error_body", "merged", "GenerationFailed"]
