"""Engine and session factory. SQLite runs in WAL mode with full fsync on commit.

A SQLite database holds patient identifiers: its file is created mode 0600 before
SQLite opens it, and SQLite gives its ``-wal`` and ``-shm`` files the database
file's mode.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 60_000
DB_FILE_MODE = 0o600
"""Mode of a new SQLite database file (and so of its -wal and -shm files)."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy, not pysqlite, issue BEGIN (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns, so an acknowledged C-STORE survives power loss.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    # A transaction takes the write lock up front, so read-then-write transactions
    # (claims, the stability sweep) cannot interleave with another writer. Sessions
    # opened with :func:`reading` only read and begin DEFERRED (no lock; WAL snapshot).
    mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
    conn.exec_driver_sql(f"BEGIN {mode}")


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_private(path: Path) -> None:
    """Create the database file at ``path`` mode :data:`DB_FILE_MODE`, before any data.

    An existing file is kept, but loses any access for others (a database created
    0644 by an older version becomes 0640).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, DB_FILE_MODE)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o007:
            path.chmod(mode & ~0o007)
        return
    try:
        os.fchmod(fd, DB_FILE_MODE)  # exactly this mode, whatever the umask
    finally:
        os.close(fd)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for an in-memory database or a ``file:`` URI."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str) -> Engine:
    """Create an engine; for a SQLite file, create it (mode 0600) and set WAL and durability
    pragmas."""
    if is_sqlite(url):
        path = sqlite_file(url)
        if path is not None:
            create_private(path)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def reading(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A read-only session: on SQLite it takes no write lock."""
    with factory() as session:
        session.connection(execution_options={"sqlite_begin": "DEFERRED"})
        yield session
