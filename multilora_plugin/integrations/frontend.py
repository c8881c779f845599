"""What every route of the HTTP server shares: the `Server` (a backend, the tokenizer, the served
names, what clients may do), queuing a request's choices all or none, waiting for their finished
outputs or merging their streams (aborting them when the client leaves), and SSE framing."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from fastapi import Request

from ..adapters import BASE_MODEL
from ..async_engine import RequestStream
from ..errors import GenerationFailed, InvalidRequestError, MultiLoRAError
from ..outputs import RequestOutput
from ..sampling import SamplingParams
from ..version import __version__
from . import protocol
from .access import AccessPolicy
from .protocol import Tokens

MAX_CHOICES = 64  # prompts × n of one OpenAI request


def sse(data: Any) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


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
                raise_failure(output)
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


def raise_failure(output: RequestOutput) -> None:
    """A request that ended in error raises it (typed errors keep their status)."""
    if output.outputs[0].finish_reason != "error":
        return
    error = output.error
    if isinstance(error, MultiLoRAError):
        raise error
    raise GenerationFailed(f"request {output.request_id} failed: {type(error).__name__}: {error}")


def headers_of(streams: list) -> Dict[str, str]:
    """Response headers a backend's streams report (Ray Serve: the replicas that serve them),
    comma-joined over the streams of one request."""
    joined: Dict[str, List[str]] = {}
    for stream in streams:
        for key, value in getattr(stream, "headers", {}).items():
            joined.setdefault(key, []).append(value)
    return {key: ",".join(values) for key, values in joined.items()}


def _chat_prompt(tokenizer, conversation: List[dict]) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this server's tokenizer has no chat template; use /v1/completions")
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - the template refuses these messages (e.g. raise_exception)
        raise InvalidRequestError(f"the chat template cannot render these messages: {exc}") from None
