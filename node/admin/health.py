"""Readiness checks: database, storage, workers, DICOM receiver. Each returns a Check."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text

from db.admin import workers
from db.engine import reading
from db.queue import SessionFactory
from node.admin.context import AdminContext


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_database(factory: SessionFactory) -> Check:
    try:
        with reading(factory) as s:
            s.execute(text("SELECT 1"))
    except Exception as exc:
        return Check("database", False, f"unreachable: {type(exc).__name__}")
    return Check("database", True, "reachable")


def check_storage(directory: os.PathLike[str] | str, min_free_mb: int) -> Check:
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".readyz-"):
            pass
        free_mb = shutil.disk_usage(directory).free // (1024 * 1024)
    except OSError as exc:
        return Check("storage", False, f"not writable: {exc.strerror or exc}")
    if free_mb < min_free_mb:
        return Check("storage", False, f"{free_mb} MB free, below the {min_free_mb} MB floor")
    return Check("storage", True, f"writable, {free_mb} MB free")


def check_workers(factory: SessionFactory, now: datetime, expected: int) -> Check:
    alive = sum(1 for w in workers(factory, now) if w.alive)
    if expected == 0:
        return Check("workers", True, f"{alive} external worker(s) alive")
    if alive == 0:
        return Check("workers", False, f"none of {expected} worker(s) alive")
    return Check("workers", True, f"{alive} of {expected} worker(s) alive")


def readiness(ctx: AdminContext) -> list[Check]:
    settings = ctx.settings
    checks = [check_database(ctx.factory),
              check_storage(settings.storage.dir, settings.storage.min_free_mb),
              check_workers(ctx.factory, ctx.clock(), settings.workers.count)]
    if ctx.receiver_problem is not None:
        problem = ctx.receiver_problem()
        checks.append(Check("dicom", problem is None,
                            problem or f"port {settings.dicom.port} listening and storing"))
    return checks
