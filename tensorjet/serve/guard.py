"""Checks made on every HTTP request before the app reads its body: the Host header (DNS rebinding), the
API key, and the body's size (declared, then as it arrives)."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tensorjet.serve.errors import error_response
from tensorjet.serve.options import ServerOptions
from tensorjet.serve.protocol import APIError

# Open without the API key: probes, scrapers and the docs.
OPEN_PATHS = frozenset(
    {"/health", "/metrics", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)


class RequestGuard:
    def __init__(self, app: ASGIApp, options: ServerOptions) -> None:
        self.app = app
        self.options = options
        self.allowed_hosts = tuple(host.lower() for host in options.allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            error, extra_headers = refusal
            await error_response(scope["method"], scope["path"], error, extra_headers)(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

    def _refusal(self, path: str, headers: Headers) -> tuple[APIError, dict[str, str] | None] | None:
        if self.allowed_hosts and not self._host_allowed(headers.get("host", "")):
            return APIError(400, "invalid Host header: this server does not answer to that name"), None
        if self.options.api_key is not None and path not in OPEN_PATHS and not self._authorized(headers):
            error = APIError(
                401,
                "missing or incorrect API key: send it as `Authorization: Bearer KEY`",
                param=None,
                code="invalid_api_key",
            )
            return error, {"WWW-Authenticate": "Bearer"}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.options.max_request_body_bytes:
            return self._too_large(), None
        return None

    def _host_allowed(self, host_header: str) -> bool:
        host = host_header.lower()
        host = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        for allowed in self.allowed_hosts:
            if allowed == "*" or host == allowed:
                return True
            if allowed.startswith("*.") and host.endswith(allowed[1:]):
                return True
        return False

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        expected = self.options.api_key.encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is larger than this server accepts "
            f"({self.options.max_request_body_bytes} bytes, --max_request_body_bytes)",
        )

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that stops a body (chunked, or longer than it declared) once it passes the limit."""
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.options.max_request_body_bytes:
                    # Raised where the route reads its body; the app's handler answers it (413).
                    raise StarletteHTTPException(413, self._too_large().message)
            return message

        return limited_receive
