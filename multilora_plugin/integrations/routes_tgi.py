"""TGI's routes (and LoRAX's `adapter_id`): POST /generate, /generate_stream (server-sent events, one per
token), / (either, by `stream`, as `huggingface_hub.InferenceClient` posts), GET /info, /health."""

from __future__ import annotations

import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import MultiLoRAError
from . import protocol
from .http_errors import error_body, status_of
from .protocol import TGIRequest
from .frontend import headers_of, merged, raise_failure, sse

router = APIRouter(tags=["TGI"])


async def _generate(body: TGIRequest, request: Request, stream: bool, as_list: bool = False) -> Response:
    server = request.app.state.server
    p = body.parameters
    ids = await server.encode(body.inputs)
    if p.truncate is not None:
        ids = ids[-p.truncate:]
    params = protocol.tgi_sampling(p, server.room(ids), token_details=stream or p.details)
    streams = await server.submit([(body.inputs, ids, params)], p.adapter_id,
                                  {"api": "tgi", "route": request.url.path}, f"tgi-{uuid.uuid4().hex}", stream)
    headers = headers_of(streams)
    if not stream:
        (output,) = await server.finished(streams, request)
        answer = protocol.tgi_response(output, params, p, server.tokens)
        return JSONResponse([answer] if as_list else answer, headers=headers)

    async def events() -> AsyncIterator[str]:
        try:
            async for _, output in merged(streams):
                raise_failure(output)
                for event in protocol.tgi_stream_events(output, params, p, server.tokens):
                    yield sse(event)
        except MultiLoRAError as exc:
            yield sse(error_body(request.url.path, status_of(exc), str(exc)))

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

@router.post("/generate", tags=["TGI"])
async def generate(body: TGIRequest, request: Request) -> Response:
    """Generate text (TGI). `parameters.adapter_id` names the adapter."""
    return await _generate(body, request, stream=False)

@router.post("/generate_stream", tags=["TGI"])
async def generate_stream(body: TGIRequest, request: Request) -> Response:
    """Generate text as server-sent events, one per token (TGI)."""
    return await _generate(body, request, stream=True)

@router.post("/", tags=["TGI"])
async def compat_generate(body: TGIRequest, request: Request) -> Response:
    """TGI's compatibility route (used by `huggingface_hub.InferenceClient`): `stream` chooses."""
    return await _generate(body, request, stream=body.stream, as_list=True)

@router.get("/info", tags=["TGI"])
async def info(request: Request) -> dict:
    return request.app.state.server.info()

@router.get("/health", tags=["TGI"])
async def health(request: Request) -> Response:
    problem = await request.app.state.server.backend.unhealthy()
    if problem is None:
        return Response(status_code=200)
    return JSONResponse(error_body("/health", 503, problem), status_code=503)
