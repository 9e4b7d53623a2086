"""Run the admin app with uvicorn in a background thread of ``ainode serve``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI
from pynetdicom.transport import AssociationServer

from db.queue import SessionFactory
from node.admin.app import create_app
from node.admin.catalog import catalog
from node.errors import StartupError
from node.infer.plugins import available_models
from node.settings import Settings

log = logging.getLogger("ainode.admin")


class AdminServer:
    """uvicorn in a daemon thread; :meth:`stop` lets in-flight requests finish."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        # log_config=None: uvicorn's lines go through the node's one-line formatter too
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off", log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="admin-http", daemon=True)
        self.address = f"{host}:{port}"

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise StartupError(f"admin server could not start on {self.address}")
            if time.monotonic() > deadline:
                raise StartupError(f"admin server did not start on {self.address} in time")
            time.sleep(0.05)
        log.info("admin server on http://%s/", self.address)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_admin(settings: Settings, factory: SessionFactory,
                receiver_problem: Callable[[], str | None] | None = None) -> AdminServer | None:
    """Build and start the admin server of ``ainode serve`` (None when disabled)."""
    if not settings.admin.enabled:
        return None
    models = catalog(lambda: available_models(settings))
    app = create_app(settings, factory, models=models, receiver_problem=receiver_problem)
    server = AdminServer(app, settings.admin.host, settings.admin.port)
    server.start()
    return server


def listening(server: AssociationServer) -> Callable[[], bool]:
    """Whether a pynetdicom server's listening socket is open."""

    def probe() -> bool:
        sock = server.socket  # pynetdicom types it Optional (None before it is bound)
        return sock is not None and sock.fileno() != -1

    return probe
