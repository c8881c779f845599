"""Errors over HTTP: the status of each kind of error, and its body in the format of the API that the
path belongs to (TGI: `{"error", "error_type"}`; OpenAI: `{"error": {"message", "type", "param",
"code"}}`). What the client can fix is a 4xx: 400 bad values or adapter files, 401 no API key, 403 not
allowed by the operator, 404 unknown adapter or route, 405 wrong method, 413 too large, 422 a body
that does not match the schema (or asks for an option this server does not implement); 503 when the
server holds `max_concurrent_requests` requests or its engine is gone; 500 only for a model failure."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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
from .access import Forbidden, RequestTooLarge, Unauthorized
from .protocol import UnsupportedOption

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
    if isinstance(error, UnsupportedOption):
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


def add_error_handlers(app: FastAPI) -> None:
    """Every error a route raises, answered in its API's format with its status."""

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:  # unknown route, wrong method, ...
        return JSONResponse(error_body(request.url.path, exc.status_code, str(exc.detail)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(MultiLoRAError)
    async def on_error(request: Request, exc: MultiLoRAError) -> JSONResponse:
        status = status_of(exc)
        message = str(exc).replace("; give its lora_path to register it", "")  # a Python hint, not an HTTP one
        retry = getattr(exc, "retry_after_s", None)  # a 503 that will pass: when to try again
        return JSONResponse(error_body(request.url.path, status, message), status_code=status,
                            headers={"Retry-After": str(retry)} if retry else None)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(error_body(request.url.path, 422, f"invalid request body: {problems}"), status_code=422)
