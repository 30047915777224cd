"""What every request passes before it reaches a route: the Host it names (without an API key), the API key,
the body's type, and the limit on its size.

All are ASGI middleware around the whole app, so they cover every route, the mounted static files and
the OpenAPI description alike, including routes added later: with an API key, everything needs it
(``Authorization: Bearer <key>``, compared in constant time) except :data:`PUBLIC_PATHS` and what lies
under :data:`PUBLIC_PREFIX`. Those reveal nothing and use no model: the web page's shell (which asks
the user for the key and fetches the model's name from ``/v1/models`` with it) and a bare liveness
probe. Every check answers before the body is read: a request without the key, or declaring a body
over the limit, costs the server no more than its headers; a chunked body is cut off once it passes
the limit.

Without a key, two checks keep web pages out: a page on another site can make its visitor's browser send
requests to a server on their machine. A body that is not declared ``application/json`` is refused (415):
the browser sends a cross-site POST without asking the server first (a CORS preflight, which this server
never grants) only with form data, plain text or no declared type at all. And a Host header that names
another host than this one is refused (421): a page whose domain name resolves to 127.0.0.1 once its
script has loaded (DNS rebinding) reads the answers as its own, but its requests still carry its name.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from medfoundry.serve import protocol

PUBLIC_PATHS = frozenset({"/", "/health"})  # the page's shell and the liveness probe: {"status": "ok"}, nothing more
PUBLIC_PREFIX = "/static/"  # the page's script and style sheet
UNAUTHORIZED = "invalid or missing API key: send the header 'Authorization: Bearer <key>'"
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})  # always answered without a key


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
        value = _header(scope, b"authorization")
        if value is None:
            return False
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)


class JsonBodies:
    """Refuses (415) a request with a body that is not declared ``Content-Type: application/json``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _has_body(scope) or _media_type(scope) == "application/json":
            return await self.app(scope, receive, send)
        await _reject(
            scope,
            receive,
            send,
            415,
            "request body: send it as JSON, with the header 'Content-Type: application/json'",
            "invalid_request_error",
            "unsupported_media_type",
        )


class LocalHosts:
    """Refuses (421) a request whose Host header names another host than :data:`LOCAL_HOSTS` or ``allowed``
    (names or addresses, with or without a port). A request without a Host header (HTTP/1.0) passes: browsers
    always send one."""

    def __init__(self, app, allowed: Iterable[str] = ()):
        self.app = app
        self.allowed = LOCAL_HOSTS | {hostname(host) for host in allowed}

    async def __call__(self, scope, receive, send):
        host = _header(scope, b"host") if scope["type"] in ("http", "websocket") else None
        if host is None or hostname(host.decode("latin-1")) in self.allowed:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await _reject(
            scope,
            receive,
            send,
            421,
            "this server has no API key and answers only requests for localhost, 127.0.0.1, [::1], the address it "
            "listens on and the hosts given with --allowed-host",
            "invalid_request_error",
            "host_not_allowed",
        )


def hostname(host: str) -> str:
    """The name in a Host header or a host given: ``Example.org:8000`` -> ``example.org``, ``[::1]:8000`` and
    ``::1`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # name:port (an IPv6 address has more colons, and no port without brackets)
        host = host.partition(":")[0]
    return host.rstrip(".")


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


def _header(scope, wanted: bytes) -> bytes | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return value
    return None


def _content_length(scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None  # the HTTP server refused a malformed one


def _has_body(scope) -> bool:
    return bool(_content_length(scope)) or _header(scope, b"transfer-encoding") is not None


def _media_type(scope) -> str:
    """The Content-Type without its parameters (``; charset=utf-8``), in lower case."""
    return (_header(scope, b"content-type") or b"").decode("latin-1").partition(";")[0].strip().lower()
