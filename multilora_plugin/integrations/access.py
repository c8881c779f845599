"""What clients of the HTTP server may do: the operator's switches, and the checks that enforce them.

    AccessPolicy(api_key=None, allow_runtime_lora_updates=False, adapter_roots=(), max_request_chars=...)

- `api_key`: every route but `/health` and `/metrics` needs `Authorization: Bearer <key>`, as OpenAI
  clients send it (401 otherwise).
- `allow_runtime_lora_updates` (off by default, as in vLLM): without it `/v1/load_lora_adapter` and
  `/v1/unload_lora_adapter` answer 403 and change nothing. With it, clients may load adapters and
  unload or replace (`load_inplace`) the ones loaded at runtime; the adapters the server started
  with stay the operator's.
- `adapter_roots`: directories runtime loads may read. A path is resolved (symbolic links and `..`
  included; a relative one against the first root, never the server's working directory) and must
  stay inside one root; a path outside every root is refused before anything is read, with the
  same answer whether it exists or not. With no root, runtime loads may read any directory the
  process can (the operator switched them on).
- Adapter names that clients give are refused when they equal the served model's name, hold a path
  separator or a control character, or are longer than `MAX_ADAPTER_NAME`.
- `max_request_chars`: a prompt (or rendered chat) longer than this is refused (413) before it is
  tokenized; a body larger than `max_request_bytes` is refused (413) before it is parsed.
"""

from __future__ import annotations

import hmac
import json
import os
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

from ..errors import InvalidRequestError, MultiLoRAError

MAX_ADAPTER_NAME = 128
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key


class Unauthorized(MultiLoRAError, PermissionError):
    """The request lacks the server's API key (HTTP 401)."""


class Forbidden(MultiLoRAError, PermissionError):
    """The operator did not allow what the request asks (HTTP 403)."""


class RequestTooLarge(InvalidRequestError):
    """A request body or prompt above the server's limit (HTTP 413)."""


@dataclass(frozen=True)
class AccessPolicy:
    api_key: Optional[str] = None
    allow_runtime_lora_updates: bool = False
    adapter_roots: Tuple[str, ...] = ()
    max_request_chars: int = 1_000_000
    max_request_bytes: int = field(default=0)  # 0: derived from max_request_chars

    def __post_init__(self) -> None:
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("`api_key` should be a non-empty string or None")
        if not isinstance(self.max_request_chars, int) or self.max_request_chars < 1:
            raise ValueError(f"`max_request_chars` should be a positive int, but got {self.max_request_chars!r}")
        roots = tuple(os.path.realpath(os.fspath(r)) for r in self.adapter_roots)
        missing = [r for r in roots if not os.path.isdir(r)]
        if missing:
            raise ValueError(f"adapter roots should be directories, but these are not: {missing}")
        object.__setattr__(self, "adapter_roots", roots)
        if not self.max_request_bytes:  # JSON may spend 6 bytes on one character (\\uXXXX), plus the rest
            object.__setattr__(self, "max_request_bytes", 6 * self.max_request_chars + (1 << 16))

    # adapters ---------------------------------------------------------------------------------------
    def check_updates(self, what: str) -> None:
        if not self.allow_runtime_lora_updates:
            raise Forbidden(f"{what} is off on this server: runtime adapter updates are not allowed (the operator "
                            "can start it with --allow-runtime-lora-updates)")

    def adapter_path(self, path: str) -> str:
        """The directory a runtime load may read for `path`, or `Forbidden`."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise InvalidRequestError(f"`lora_path` should be a directory path, but got {path!r}")
        if not self.adapter_roots:
            return path
        resolved = os.path.realpath(os.path.join(self.adapter_roots[0], path))
        for root in self.adapter_roots:
            if os.path.commonpath([resolved, root]) == root:
                return resolved
        raise Forbidden(f"`lora_path` {path!r} is not inside an adapter root this server allows")

    @staticmethod
    def check_name(name: str, served_name: str) -> None:
        problem = None
        if not name:
            problem = "it is empty"
        elif len(name) > MAX_ADAPTER_NAME:
            problem = f"it is {len(name)} characters long (at most {MAX_ADAPTER_NAME})"
        elif name == served_name:
            problem = "it is the served model's own name"
        elif any(c in name for c in ("/", "\\")) or any(unicodedata.category(c).startswith("C") for c in name):
            problem = "it holds a path separator or a control character"
        if problem:
            raise InvalidRequestError(f"`lora_name` {name[:MAX_ADAPTER_NAME]!r} cannot name an adapter: {problem}")

    # requests ---------------------------------------------------------------------------------------
    def check_chars(self, text: str, what: str = "the prompt") -> None:
        if len(text) > self.max_request_chars:
            raise RequestTooLarge(f"{what} holds {len(text)} characters, more than this server's limit of "
                                  f"{self.max_request_chars} (max_request_chars)")

    def authorized(self, authorization: Optional[str]) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


class Gate:
    """ASGI middleware: the API key and the body size, checked before a route (or the body parser)
    runs. Refusals come in the format of the API the path belongs to (`error_body`)."""

    def __init__(self, app, policy: AccessPolicy, error_body: Callable[[str, int, str], dict]) -> None:
        self.app, self.policy, self.error_body = app, policy, error_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        if path not in OPEN_PATHS and not self.policy.authorized(headers.get("authorization")):
            return await self._refuse(send, path, 401, "a valid API key is needed: send `Authorization: Bearer <key>`",
                                      {"www-authenticate": "Bearer"})
        limit = self.policy.max_request_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await self._refuse(send, path, 413, f"the request body has {length} bytes, more than this "
                                                       f"server's limit of {limit}")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise RequestTooLarge(f"the request body is larger than this server's limit of {limit} bytes")
            return message

        return await self.app(scope, counted, send)

    async def _refuse(self, send, path: str, status: int, message: str, extra: Optional[dict] = None) -> None:
        body = json.dumps(self.error_body(path, status, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def utf8_problem(value, where: str = "the body") -> Optional[str]:
    """Where a lone UTF-16 surrogate (valid JSON, not valid Unicode text) sits in `value`, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{where} holds a lone UTF-16 surrogate at character {exc.start}: text should be valid Unicode"
        return None
    items: Sequence = ()
    if isinstance(value, dict):
        items = [(where, k) for k in value] + [(f"{where}.{k}", v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    for name, item in items:
        problem = utf8_problem(item, name)
        if problem:
            return problem
    return None
