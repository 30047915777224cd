"""What every request passes before it reaches a route: the API key, and the limit on the body's size.

Both are ASGI middleware around the whole app, so they cover every route, the mounted static files and
the OpenAPI description alike, including routes added later: with an API key, everything needs it
(``Authorization: Bearer <key>``, compared in constant time) except :data:`PUBLIC_PATHS` and what lies
under :data:`PUBLIC_PREFIX`. Those reveal nothing and use no model: the web page's shell (which asks
the user for the key and fetches the model's name from ``/v1/models`` with it) and a bare liveness
probe. Both checks answer before the body is read: a request without the key, or declaring a body
over the limit, costs the server no more than its headers; a chunked body is cut off once it passes
the limit.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from medfoundry.serve import protocol

PUBLIC_PATHS = frozenset({"/", "/health"})  # the page's shell and the liveness probe: {"status": "ok"}, nothing more
PUBLIC_PREFIX = "/static/"  # the page's script and style sheet
UNAUTHORIZED = "invalid or missing API key: send the header 'Authorization: Bearer <key>'"


def route_path(scope) -> str:
    """The path the router matches: without the ``root_path`` a proxy mounted the app under."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX)


async def _reject(scope, receive, send, status: int, message: str, kind: str, code: str, headers: dict | None = None):
    response = JSONResponse(protocol.error_body(message, kind, code=code), status_code=status, headers=headers)
    await response(scope, receive, send)


class ApiKeyGuard:
    """Refuses (401) every request but the public ones that lacks ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] not in ("http", "websocket")
            or self.expected is None
            or is_public(route_path(scope))
            or self._authorized(scope)
        ):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # no such route today; refused all the same, should one be added
            return await send({"type": "websocket.close", "code": 1008})
        await _reject(
            scope,
            receive,
            send,
            401,
            UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)
        return False


class BodyLimit:
    """Refuses (413) a body over ``max_bytes``: at once when its Content-Length says so, else as soon as
    the bytes read pass the limit (the route reading it gets an ``HTTPException``, answered as a 413)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def message(self, size: str) -> str:
        return f"request body: {size} bytes, more than this server's limit of {self.max_bytes} (--max-body-bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await _reject(
                scope, receive, send, 413, self.message(str(declared)), "invalid_request_error", "request_too_large"
            )
        received = 0

        async def receive_within_limit():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message(f"over {received}"))
            return message

        await self.app(scope, receive_within_limit, send)


def _content_length(scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # the HTTP server already refused a malformed one
    return None
