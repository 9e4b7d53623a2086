"""Run the Alembic migrations shipped in ``db/migrations``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from db.engine import is_sqlite, make_engine

HERE = Path(__file__).resolve().parent
MIGRATION_LOCK = 0x41494E4F44  # "AINOD": the advisory lock several nodes take to migrate


def alembic_config(url: str) -> Config:
    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (idempotent).

    On PostgreSQL several nodes may start at once: each holds an advisory lock
    while it migrates, so the second finds the schema already at ``revision``.
    """
    cfg = alembic_config(url)
    if is_sqlite(url):
        command.upgrade(cfg, revision)
        return
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            conn.commit()  # a session-level lock: it outlives this transaction
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
                conn.commit()
    finally:
        engine.dispose()
