"""Operational tables added by migration 0002: the admin audit log and worker presence.

Both import :class:`db.schema.Base`, so they share the queue's metadata (and the
migrated-schema test); ``db/migrations/env.py`` imports this module.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from db.schema import Base


class AuditEntry(Base):
    """One admin action: who did what to which object, when, and the outcome."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(128))
    """The authenticated user, ``token`` or ``local`` (loopback without auth), and the address."""
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(128))
    detail: Mapped[str] = mapped_column(Text, default="")


class WorkerPresence(Base):
    """A worker process seen recently: its owner id (host:pid) and device."""

    __tablename__ = "worker_presence"

    owner: Mapped[str] = mapped_column(String(128), primary_key=True)
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime]
    seen_at: Mapped[datetime]
