"""The HTTP server: TGI- and OpenAI-compatible routes over one engine (FastAPI).

    app = create_app(engine)            # engine = multilora_plugin.Engine(wrap(model), tokenizer)
    uvicorn.run(app, port=8000)         # or: multilora serve --model PATH --adapter NAME=PATH ...

The routes (`routes_tgi`, `routes_openai`) reach the engine through a backend (the contract:
`integrations.backend`): `EngineBackend` for an engine in this process, `EngineProcess` for one in a
process of its own, `TransformersBackend` for transformers' continuous batching, `RayBackend` for
engine replicas on Ray Serve. This module holds the app factory and what the routes share.

Routes
    TGI / LoRAX   POST /generate, POST /generate_stream (server-sent events), POST / (either, by
                  `stream`), GET /info, GET /health; `parameters.adapter_id` picks the adapter
    OpenAI        GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true`:
                  server-sent events ending in `[DONE]`), POST /v1/load_lora_adapter,
                  POST /v1/unload_lora_adapter; `model` names the adapter or the base model
    Prometheus    GET /metrics

Errors come in each API's own format, with the status of their kind (`integrations.http_errors`). A client that goes away aborts its request: its queue entry, slot
reference and KV rows are freed at the next step.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..engine import Engine
from ..version import __version__
from . import routes_openai, routes_tgi
from .access import AccessPolicy, Gate
from .engine_backend import EngineBackend
from .frontend import Server
from .http_errors import add_error_handlers, error_body


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

    add_error_handlers(app)
    app.include_router(routes_tgi.router)
    app.include_router(routes_openai.router)

    # Prometheus -----------------------------------------------------------------------------------
    @app.get("/metrics", tags=["metrics"])
    async def metrics() -> Response:
        text = await backend.render_metrics()
        if text is None:
            return JSONResponse(error_body("/metrics", 404, backend.metrics_elsewhere), status_code=404)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app
