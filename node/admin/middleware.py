"""Checks made on every request before routing, authentication or body parsing.

:class:`TrustedHosts` answers 400 to a ``Host`` header not in ``admin.allowed_hosts``
(a DNS-rebinding page reaches the server under its own name); :class:`BodyLimit`
answers 413 to a body larger than ``admin.max_body_kb`` without reading it.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.settings import host_name


def host_of(netloc: str) -> str | None:
    """The host name of a ``Host`` header or URL authority (port dropped); None if malformed."""
    if netloc.startswith("["):
        end = netloc.find("]") + 1
        name, rest = netloc[:end], netloc[end:]
    else:
        name, sep, port = netloc.partition(":")
        rest = sep + port
    if not end_is_port(rest) or not name:
        return None
    return host_name(name)


def end_is_port(rest: str) -> bool:
    return rest == "" or (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6)


class TrustedHosts:
    """Refuse a request whose ``Host`` header names none of ``hosts`` (any port)."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = frozenset(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allowed(Headers(scope=scope).get("host", "")):
            response = JSONResponse({"detail": "Host header not allowed (admin.allowed_hosts)"},
                                    status_code=400)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def allowed(self, header: str) -> bool:
        return host_of(header) in self.hosts


class BodyTooLarge(HTTPException):
    """A request body over the limit (FastAPI lets an HTTPException from ``receive`` pass)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit // 1024} KiB (admin.max_body_kb)")


class BodyLimit:
    """413 for a body over ``limit`` bytes: at once by its Content-Length, else when streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            error = BodyTooLarge(self.limit)
            response = JSONResponse({"detail": error.detail}, status_code=error.status_code)
            await response(scope, receive, send)
            return
        await self.app(scope, self.counting(receive), send)

    def counting(self, receive: Receive) -> Receive:
        """``receive`` that raises :class:`BodyTooLarge` once the chunks pass the limit."""
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        return limited
