"""What the admin server's routes need, passed in once by :func:`node.admin.app.create_app`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from fastapi import Request

from db.queue import SessionFactory
from node.admin.auth import Guard
from node.admin.catalog import ModelInfo
from node.send.sender import EchoResult
from node.settings import Destination, Settings

Echo = Callable[[Destination, str], EchoResult]


@dataclass(frozen=True)
class AdminContext:
    settings: Settings
    factory: SessionFactory
    clock: Callable[[], datetime]
    guard: Guard
    models: Callable[[], list[ModelInfo]]
    echo: Echo
    receiver_problem: Callable[[], str | None] | None = None
    """Probe of the DICOM receiver for /readyz: why it is not listening or not storing,
    None when it is; no probe where the app runs without a receiver."""


def context(request: Request) -> AdminContext:
    """FastAPI dependency: the context stored on the app."""
    ctx = request.app.state.ctx
    assert isinstance(ctx, AdminContext)
    return ctx
