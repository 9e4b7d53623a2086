"""Data migrations: rows written under an older revision read right after the upgrade."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Integer, String, Text, column, insert, select, table, text

from db.engine import make_engine, make_session_factory
from db.migrate import alembic_config, upgrade
from db.queue import get_job
from db.schema import Job
from tests.conftest import T0, assert_schema_matches

JOB_DESTINATIONS = {1: "pacs,backup", 2: "", 3: "pacs"}
"""``jobs.destinations`` as revision 0003 stored it (comma-joined)."""


def _fill_revision_0003(url: str) -> None:
    """A study, a series and one job per entry of :data:`JOB_DESTINATIONS`, as 0003 wrote them."""
    studies = table("studies", column("id", Integer), column("study_uid", String),
                    column("first_received_at"), column("last_received_at"), column("runs"))
    series = table("series", column("id", Integer), column("study_id", Integer),
                   column("series_uid", String), column("modality", String),
                   column("sop_class_uid", String), column("body_part", String),
                   column("series_description", String), column("instance_count", Integer),
                   column("last_received_at"), column("pending"), column("runs", Integer))
    jobs = table("jobs", column("id", Integer), column("series_id", Integer),
                 column("study_id", Integer), column("model", String), column("route", String),
                 column("destinations", Text), column("run", Integer), column("uid_seed", String),
                 column("status", String), column("attempts", Integer),
                 column("max_attempts", Integer), column("created_at"))
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(studies).values(id=1, study_uid="1.2.3", first_received_at=T0,
                                            last_received_at=T0, runs=1))
        conn.execute(insert(series).values(
            id=1, study_id=1, series_uid="1.2.3.1", modality="CT", sop_class_uid="",
            body_part="", series_description="", instance_count=1, last_received_at=T0,
            pending=False, runs=1))
        for job_id, names in JOB_DESTINATIONS.items():
            conn.execute(insert(jobs).values(
                id=job_id, series_id=1, study_id=1, model=f"model-{job_id}", route="r",
                destinations=names, run=1, uid_seed=f"seed-{job_id}", status="done",
                attempts=1, max_attempts=3, created_at=T0))
    engine.dispose()


def _stored_text(url: str) -> dict[int, str]:
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, destinations FROM jobs ORDER BY id")).all()
    engine.dispose()
    return {job_id: str(names) for job_id, names in rows}


def check_destinations_become_json_lists(url: str) -> None:
    """0003 -> head turns "pacs,backup" into ["pacs", "backup"]; the downgrade joins them."""
    upgrade(url, "0003")
    _fill_revision_0003(url)
    upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with factory() as s:
        stored = {row.id: row.destinations
                  for row in s.execute(select(Job.id, Job.destinations).order_by(Job.id))}
    assert stored == {1: ["pacs", "backup"], 2: [], 3: ["pacs"]}
    job = get_job(factory, 1)
    assert job is not None and job.destinations == ("pacs", "backup")
    engine.dispose()
    assert_schema_matches(url)

    command.downgrade(alembic_config(url), "0003")
    assert _stored_text(url) == JOB_DESTINATIONS
    upgrade(url)
    assert_schema_matches(url)


def test_comma_joined_destinations_become_json_lists(tmp_path: Path) -> None:
    check_destinations_become_json_lists(f"sqlite:///{tmp_path / 'old.db'}")


def test_a_failed_sqlite_upgrade_leaves_the_schema_as_it_was(tmp_path: Path) -> None:
    """The upgrade is one transaction: a job naming a missing series stops it whole."""
    url = f"sqlite:///{tmp_path / 'broken.db'}"
    upgrade(url, "0003")
    _fill_revision_0003(url)
    engine = make_engine(url)
    raw = engine.raw_connection()  # outside a transaction, where the pragma takes effect
    try:
        raw.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        raw.driver_connection.execute(  # type: ignore[union-attr]
            "UPDATE jobs SET series_id = 99 WHERE id = 3")
    finally:
        raw.close()
    engine.dispose()
    with pytest.raises(RuntimeError, match="referencing missing rows"):
        upgrade(url)
    assert _stored_text(url) == JOB_DESTINATIONS
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"
    engine.dispose()
