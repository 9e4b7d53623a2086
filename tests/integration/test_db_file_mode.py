"""The SQLite database holds patient identifiers: its files are not readable by others."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sqlalchemy import text

from db.engine import make_engine
from db.migrate import upgrade


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_fresh_database_and_its_wal_and_shm_are_private(tmp_path: Path) -> None:
    db = tmp_path / "var" / "ainode.db"
    url = f"sqlite:///{db}"
    old_umask = os.umask(0o022)  # the usual umask, which would make them 0644
    try:
        upgrade(url)
        engine = make_engine(url)
        with engine.connect() as conn:  # an open connection keeps the -wal and -shm files
            conn.execute(text("SELECT count(*) FROM jobs"))
            wal, shm = db.with_name("ainode.db-wal"), db.with_name("ainode.db-shm")
            assert wal.exists() and shm.exists()
            assert (mode(db), mode(wal), mode(shm)) == (0o600, 0o600, 0o600)
        engine.dispose()
    finally:
        os.umask(old_umask)


def test_existing_world_readable_database_loses_access_for_others(tmp_path: Path) -> None:
    db = tmp_path / "ainode.db"
    db.touch(mode=0o644)
    db.chmod(0o644)
    make_engine(f"sqlite:///{db}").dispose()
    assert mode(db) == 0o640
