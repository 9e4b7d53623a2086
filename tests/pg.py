"""A real PostgreSQL 15 server for the tests: one per test session, on a loopback port.

``initdb`` and ``postgres`` refuse to run as root, so as root they run as the
``postgres`` user on a temp folder it owns. Each test gets a database of its own
(migrated with the node's Alembic migrations); the server is stopped with
``pg_ctl stop`` when the session ends. ``make test`` installs the server
(Debian ``postgresql-15``) when it is missing.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from tests.peers import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(cmd: list[str]) -> list[str]:
    """Run ``cmd`` as the ``postgres`` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PostgresServer:
    datadir: Path
    port: int
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; return its URL."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m",
                                     "fast", "-w", "stop"]),
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """initdb a temp cluster and start it on a free loopback port (socket in the same folder)."""
    if not (PG_BIN / "postgres").exists():
        pytest.fail(f"PostgreSQL 15 is not installed ({PG_BIN}): run `make system-deps`")
    base = Path(tempfile.mkdtemp(prefix="ainode-pg-"))
    datadir = base / "data"
    datadir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(datadir, "postgres")
    port = free_port()
    subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(datadir), "-A", "trust",
                                 "-U", "postgres", "--no-sync"]),
                   check=True, capture_output=True, timeout=120)
    options = (f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off "
               "-c max_connections=200")
    subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(datadir), "-o", options,
                                 "-l", str(base / "postgres.log"), "-w", "start"]),
                   check=True, capture_output=True, timeout=120)
    return PostgresServer(datadir, port)


# Test modules import these under their function names (``from tests.pg import
# pg_factory_fixture``); tests ask for them by the fixture names.
@pytest.fixture(scope="session", name="postgres")
def postgres_fixture() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(name="pg_url")
def pg_url_fixture(postgres: PostgresServer) -> str:
    """A fresh database on the session's server, migrated to the latest revision."""
    url = postgres.create_database()
    upgrade(url)
    return url


@pytest.fixture(name="pg_factory")
def pg_factory_fixture(pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_url)
    yield make_session_factory(engine)
    engine.dispose()
