"""Shared fixtures and helpers of every tier: a migrated SQLite queue, Orthanc, queue rows."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.queue import InstanceMeta, JobPlan, SeriesInfo, dispatch_stable_studies
from db.schema import Base
from tests.peers import Orthanc, free_port, start_orthanc

Factory = sessionmaker[Session]
T0 = datetime(2026, 1, 1, 12, 0, 0)
"""The tests' "now": every queue test runs on this clock."""


def meta(sop: str, series: str = "1.2.3.1", study: str = "1.2.3", modality: str = "CT"
         ) -> InstanceMeta:
    """A received CT instance's row data, as the ingest records it."""
    return InstanceMeta(study_uid=study, series_uid=series, sop_uid=sop,
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        transfer_syntax="1.2.840.10008.1.2.1",
                        path=f"instances/{sop}.dcm", size=10, calling_ae="TEST", modality=modality)


def one_model(series: SeriesInfo) -> list[JobPlan]:
    return [JobPlan(series_id=series.id, model="ct-lung", route="r", destinations=("pacs",))]


def dispatch(factory: Factory, now: datetime, quiet: float = 60.0) -> list[int]:
    """Complete quiet studies, one ``ct-lung`` job per series for destination ``pacs``."""
    return dispatch_stable_studies(factory, now, lambda _m: quiet, one_model, max_attempts=2)


def assert_schema_matches(url: str) -> None:
    """The migrated database at ``url`` has exactly the declared schema."""
    engine = make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ainode.db'}"
    upgrade(url)
    return url


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def node_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path: Path, node_port: int) -> Iterator[Orthanc]:
    pacs = start_orthanc(tmp_path / "orthanc", node_port)
    yield pacs
    pacs.stop()
