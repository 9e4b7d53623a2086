"""Run the admin app with uvicorn in a background thread of ``ainode serve``.

The admin server shares its process with the DICOM receiver, so no HTTP client may
make it hold an unbounded number of connections (file descriptors) or hold one forever:

* :class:`Listener`: at most ``admin.max_connections`` accepted connections are open
  at a time; one accepted beyond them is closed at once, before any TLS or HTTP. With
  that many open, uvicorn answers requests 503 (``limit_concurrency``).
* :class:`DeadlineH11Protocol`: a request (line, headers and body) must arrive whole
  within ``admin.request_timeout`` of its connection or of the previous response, or
  the connection is dropped: uvicorn has no such timeout of its own, so a client
  trickling a request line (slowloris) would otherwise hold its connection forever.
  A TLS handshake gets the same time (:class:`AdminLoop`); an idle keep-alive
  connection is closed after :data:`KEEP_ALIVE_SECONDS`; request headers are at most
  :data:`MAX_HEADER_BYTES`.

The loop is always asyncio's selector loop (never uvloop, which accepts in C): the
cap works on the listening socket's ``accept``. With ``admin.tls_cert`` and
``admin.tls_key`` the server speaks HTTPS only, TLS 1.2 at least.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from pynetdicom.transport import AssociationServer
from uvicorn.protocols.http.h11_impl import H11Protocol

from db.queue import SessionFactory
from node.admin.app import create_app
from node.admin.auth import is_loopback
from node.admin.catalog import catalog
from node.errors import StartupError
from node.infer.plugins import available_models
from node.settings import AdminSettings, Settings
from node.tls import unreadable

log = logging.getLogger("ainode.admin")

KEEP_ALIVE_SECONDS = 5
"""An idle keep-alive connection is closed after this long (the dashboard polls every 3 s)."""
MAX_HEADER_BYTES = 16 * 1024
"""A request line and headers larger than this get 400 (h11's buffer for them)."""
BACKLOG = 1024


# --- connection cap ---------------------------------------------------------------------


class Slots:
    """The connections a server's listeners accepted: at most ``limit`` open at a time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._accepted: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._full = False
        self.refused = 0
        """Connections closed on arrival because ``limit`` were open."""

    def open(self) -> int:
        """Accepted connections not yet closed (a closed socket's fileno is -1)."""
        return sum(1 for conn in list(self._accepted) if conn.fileno() != -1)

    def admit(self, conn: socket.socket) -> bool:
        if self.open() < self.limit:
            self._accepted.add(conn)
            self._full = False
            return True
        self.refused += 1
        if not self._full:
            self._full = True
            log.warning("admin server: %d connections open (admin.max_connections): "
                        "closing new ones until some end", self.limit)
        return False


class Listener(socket.socket):
    """A listening socket whose ``accept`` closes what arrives while its slots are full.

    asyncio's selector loop calls this ``accept`` for each connection waiting; the
    connections refused never reach uvicorn, and hold their descriptor for no longer
    than this call.
    """

    slots: Slots

    def accept(self) -> tuple[socket.socket, Any]:
        while True:
            conn, address = super().accept()  # BlockingIOError once none is waiting
            if self.slots.admit(conn):
                return conn, address
            conn.close()


def bind(host: str, port: int, slots: Slots) -> list[socket.socket]:
    """Listening sockets for every address of ``host`` (as asyncio's create_server binds)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    listeners: list[socket.socket] = []
    try:
        for family, _type, proto, _name, address in dict.fromkeys(infos):
            sock = Listener(family, socket.SOCK_STREAM, proto)
            listeners.append(sock)
            sock.slots = slots
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError:
        for bound in listeners:
            bound.close()
        raise
    return listeners


# --- request deadline -------------------------------------------------------------------


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, dropping a connection whose request is not whole in time.

    The deadline is set when the connection is made (after the TLS handshake) and again
    when a response is complete; when it passes while the request is still arriving
    (h11: the client is IDLE or SEND_BODY), the connection is aborted. A request being
    answered is not cut short.
    """

    request_timeout: float = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.debug("admin server: dropping %s: no whole request within %g s "
                  "(admin.request_timeout)", client, self.request_timeout)
        self.transport.abort()


def deadline_protocol(request_timeout: float) -> type[DeadlineH11Protocol]:
    """:class:`DeadlineH11Protocol` with ``request_timeout``."""

    class Protocol(DeadlineH11Protocol):
        pass

    Protocol.request_timeout = request_timeout
    return Protocol


class AdminLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop, giving TLS handshakes ``handshake_timeout`` (not 60 s)."""

    handshake_timeout: float = 10.0

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        if kwargs.get("ssl") is not None:
            kwargs["ssl_handshake_timeout"] = self.handshake_timeout
        return await super().create_server(*args, **kwargs)


# --- TLS --------------------------------------------------------------------------------


def tls_problems(admin: AdminSettings) -> list[str]:
    """The admin certificate and key are readable and load together; each problem names its key."""
    if admin.tls_cert is None or admin.tls_key is None:
        return []
    problems = unreadable([("admin.tls_cert", admin.tls_cert),
                           ("admin.tls_key", admin.tls_key)])
    if problems:
        return problems
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(admin.tls_cert, admin.tls_key)
    except (OSError, ssl.SSLError) as exc:
        return [f"admin.tls_cert, admin.tls_key: cannot load certificate and key: {exc}"]
    return []


def clear_text_warning(admin: AdminSettings) -> str | None:
    """Why credentials would cross the network unencrypted; None when they do not."""
    if admin.tls_cert is not None or is_loopback(admin.host):
        return None
    return (f"admin.host {admin.host!r} is not loopback and admin.tls_cert/admin.tls_key are "
            "not set: passwords (HTTP Basic) and tokens travel in clear; set them, or put a "
            "TLS proxy in front on loopback")


# --- server -----------------------------------------------------------------------------


class AdminServer:
    """uvicorn in a daemon thread; :meth:`stop` lets in-flight requests finish."""

    def __init__(self, app: FastAPI, host: str, port: int, *, max_connections: int = 64,
                 request_timeout: float = 10.0, tls_cert: Path | None = None,
                 tls_key: Path | None = None) -> None:
        # log_config=None: uvicorn's lines go through the node's one-line formatter too
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
            log_config=None, http=deadline_protocol(request_timeout), ws="none",
            limit_concurrency=max_connections, timeout_keep_alive=KEEP_ALIVE_SECONDS,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            ssl_certfile=tls_cert, ssl_keyfile=tls_key)
        try:
            config.load()
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"admin server: cannot load admin.tls_cert/tls_key: {exc}") \
                from exc
        if config.ssl is not None:
            config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server = uvicorn.Server(config)
        self.slots = Slots(max_connections)
        self.request_timeout = request_timeout
        self.listeners: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, name="admin-http", daemon=True)
        self.scheme = "https" if config.ssl is not None else "http"
        self.host, self.port = host, port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = AdminLoop()
        loop.handshake_timeout = self.request_timeout
        return loop

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=self._loop) as runner:
            runner.run(self.server.serve(sockets=self.listeners))

    def start(self, timeout: float = 10.0) -> None:
        try:
            self.listeners = bind(self.host, self.port, self.slots)
        except OSError as exc:
            raise StartupError(f"admin server could not start on {self.address}: {exc}") \
                from exc
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop(0)
                for sock in self.listeners:
                    sock.close()
                raise StartupError(f"admin server could not start on {self.address}")
            time.sleep(0.05)
        log.info("admin server on %s://%s/", self.scheme, self.address)

    def open_connections(self) -> int:
        """Connections accepted and not yet closed."""
        return self.slots.open()

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)


def start_admin(settings: Settings, factory: SessionFactory,
                receiver_problem: Callable[[], str | None] | None = None) -> AdminServer | None:
    """Build and start the admin server of ``ainode serve`` (None when disabled)."""
    admin = settings.admin
    if not admin.enabled:
        return None
    models = catalog(lambda: available_models(settings))
    app = create_app(settings, factory, models=models, receiver_problem=receiver_problem)
    server = AdminServer(app, admin.host, admin.port, max_connections=admin.max_connections,
                         request_timeout=admin.request_timeout, tls_cert=admin.tls_cert,
                         tls_key=admin.tls_key)
    warning = clear_text_warning(admin)
    if warning is not None:
        log.warning("%s", warning)
    server.start()
    return server


def listening(server: AssociationServer) -> Callable[[], bool]:
    """Whether a pynetdicom server's listening socket is open."""

    def probe() -> bool:
        sock = server.socket  # pynetdicom types it Optional (None before it is bound)
        return sock is not None and sock.fileno() != -1

    return probe
