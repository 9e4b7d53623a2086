"""Alembic environment: runs on the connection or URL given by db.migrate."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from alembic import context
from sqlalchemy import Connection

import db.audit  # noqa: F401  (registers the audit and presence tables)
from db.engine import make_engine
from db.schema import Base

config = context.config
target_metadata = Base.metadata


@contextmanager
def _foreign_keys_off(connection: Connection) -> Iterator[None]:
    """On SQLite, stop enforcing foreign keys while the migrations run.

    A batch migration rebuilds a table (copy, drop, rename); dropping a table that
    others reference (``jobs``, by ``results``) fails while foreign keys are
    enforced, even deferred. SQLite ignores the pragma inside a transaction, so it
    is set on the driver's connection before the migration transaction begins;
    :func:`_check_foreign_keys` checks every reference before it commits.
    """
    if connection.dialect.name != "sqlite" or connection.in_transaction():
        yield
        return
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        driver.execute("PRAGMA foreign_keys=ON")


def _check_foreign_keys(connection: Connection) -> None:
    """Fail (and roll the migration back) if a SQLite row references a missing row."""
    if connection.dialect.name != "sqlite":
        return
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        raise RuntimeError(f"migration left rows referencing missing rows: {broken[:5]}")


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # One transaction for the whole upgrade, on SQLite too (its DDL is transactional):
        # an upgrade that fails, or breaks a reference, leaves the schema as it was.
        transactional_ddl=True,
    )
    with _foreign_keys_off(connection), context.begin_transaction():
        context.run_migrations()
        _check_foreign_keys(connection)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


run_migrations_online()
