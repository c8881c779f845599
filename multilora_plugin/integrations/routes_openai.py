"""OpenAI's routes (as vLLM serves them): GET /v1/models, POST /v1/completions, /v1/chat/completions
(`stream: true`: server-sent events ending in `[DONE]`), /v1/load_lora_adapter, /v1/unload_lora_adapter
(off unless the operator allows runtime updates). `model` names the adapter, or the base model."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, AsyncIterator, Dict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..errors import AdapterExistsError, InvalidRequestError, MultiLoRAError
from ..outputs import RequestOutput
from ..sampling import SamplingParams
from . import protocol
from .access import Forbidden
from .http_errors import error_body, status_of
from .protocol import ChatCompletionRequest, CompletionRequest, LoadLoRARequest, Tokens, UnloadLoRARequest
from .frontend import MAX_CHOICES, headers_of, merged, raise_failure, sse

router = APIRouter(tags=["OpenAI"])


@router.get("/v1/models", tags=["OpenAI"])
async def models(request: Request) -> dict:
    server = request.app.state.server
    created = protocol.now()
    cards = [{"id": server.model_name, "object": "model", "created": created, "owned_by": "multilora_plugin",
              "root": server.model_name, "parent": None}]
    for name, path in sorted(server.backend.adapters().items()):
        cards.append({"id": name, "object": "model", "created": created, "owned_by": "multilora_plugin",
                      "root": path, "parent": server.model_name})
    return {"object": "list", "data": cards}

async def _answer(body, request: Request, jobs, kind: str) -> Response:
    """Shared by completions and chat completions: `jobs` are (text, ids, params), one per choice."""
    server = request.app.state.server
    if len(jobs) > MAX_CHOICES:
        raise InvalidRequestError(f"one request may ask for at most {MAX_CHOICES} choices (prompts × n), "
                                  f"but this one asks for {len(jobs)}")
    request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    metadata = {"api": "openai", "route": request.url.path, "user": body.user}
    streams = await server.submit(jobs, server.adapter_of(body.model), metadata, request_id, body.stream)
    headers = headers_of(streams)
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
                raise_failure(output)
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
                yield sse(chunk)
            if include_usage:
                yield sse({"id": request_id, "object": obj, "created": created, "model": body.model,
                            "choices": [], "usage": protocol.usage(prompt_tokens, sum(counts.values()))})
        except MultiLoRAError as exc:
            yield sse(error_body(request.url.path, status_of(exc), str(exc)))
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

@router.post("/v1/completions", tags=["OpenAI"])
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Text completions; `model` is an adapter name or the base model's."""
    server = request.app.state.server
    prompts = body.prompts()
    jobs = []
    for prompt in prompts:
        text, ids = (prompt, await server.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
        params = body.params(server.room(ids))
        jobs += [(text, ids, _nth(params, i)) for i in range(body.n)]
    return await _answer(body, request, jobs, "completion")

@router.post("/v1/chat/completions", tags=["OpenAI"])
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """Chat completions with the tokenizer's chat template; `model` as for completions."""
    server = request.app.state.server
    text = await server.chat_prompt(body.conversation())
    ids = await server.encode(text, special=False)
    params = body.params(server.room(ids))
    return await _answer(body, request, [(text, ids, _nth(params, i)) for i in range(body.n)], "chat")

@router.post("/v1/load_lora_adapter", tags=["OpenAI"])
async def load_lora_adapter(body: LoadLoRARequest, request: Request) -> Response:
    """Load a PEFT adapter directory (as vLLM does); it can be used as `model` right away. With
    `load_inplace: true`, an adapter of that name gets the new files: requests running with it
    finish on the old weights, later ones use the new. Off unless the server allows runtime updates."""
    server = request.app.state.server
    backend, name, policy = server.backend, body.lora_name, server.access
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

@router.post("/v1/unload_lora_adapter", tags=["OpenAI"])
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request) -> Response:
    """Forget an adapter loaded at runtime; requests already running with it finish first."""
    server = request.app.state.server
    server.access.check_updates("/v1/unload_lora_adapter")
    if body.lora_name in server.operator_adapters:
        raise Forbidden(f"adapter {body.lora_name!r} was loaded by the operator when the server started; "
                        "clients cannot unload it")
    await server.backend.unload_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _nth(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of `n` choices: its own seed, so seeded choices differ from each other."""
    if i == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + i) % 2**64)


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
    logprobs = protocol.completion_logprobs(completion, output.prompt_token_ids, 0, tokens, len(prefix), k)
    if echo and output.prompt_logprobs is not None:
        logprobs = protocol.echoed_logprobs(output, tokens, k, logprobs)
    return {"index": index, "text": prefix + completion.text, "logprobs": logprobs, "finish_reason": reason}


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
    logprobs = protocol.completion_logprobs(completion, output.prompt_token_ids + completion.token_ids[:start],
                                            start, tokens, len(prefix), k)
    if echo and output.prompt_logprobs is not None:  # the prompt's, in the first chunk
        logprobs = protocol.echoed_logprobs(output, tokens, k, logprobs)
    return {"index": index, "text": prefix + completion.delta_text, "logprobs": logprobs, "finish_reason": reason}
