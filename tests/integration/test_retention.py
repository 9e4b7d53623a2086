"""Retention on a real SQLite file and real files: only finished, delivered studies go."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from db.audit import AuditEntry
from db.queue import (
    InstanceMeta,
    JobPlan,
    ResultSpec,
    SeriesInfo,
    claim_job,
    claim_results,
    complete_job,
    dispatch_stable_studies,
    fail_job,
    mark_send_failed,
    mark_sent,
    record_instance,
)
from db.retention import purge_expired, remove_files
from db.schema import Instance, Job, Result, Series, Study
from node.runtime.scheduler import make_scheduler
from node.settings import Settings
from node.store.files import instance_path, result_path, write_file
from tests.conftest import T0, Factory

DONE_AT = T0 + timedelta(minutes=2)
LATER = T0 + timedelta(days=31)
DAYS = 30.0


def ingest(factory: Factory, root: Path, study: str, count: int = 2,
           at: datetime = T0, first: int = 1) -> list[Path]:
    """Store ``count`` instance files of one series and record them; return the files."""
    series = f"{study}.1"
    files = []
    for n in range(first, first + count):
        sop = f"{series}.{n}"
        rel = instance_path(study, series, sop)
        write_file(root, rel, b"DICM")
        record_instance(factory, InstanceMeta(
            study_uid=study, series_uid=series, sop_uid=sop,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
            path=str(rel), size=4, calling_ae="TEST", modality="CT"), at)
        files.append(root / rel)
    return files


def one_model(series: SeriesInfo) -> list[JobPlan]:
    return [JobPlan(series_id=series.id, model="ct-lung", route="r",
                    destinations=("pacs", "ris"))]


def dispatch(factory: Factory, at: datetime = DONE_AT) -> list[int]:
    return dispatch_stable_studies(factory, at, lambda _m: 60.0, one_model, max_attempts=1)


def run_job(factory: Factory, root: Path, uid: str) -> list[Path]:
    """Claim the next job, write one result file and complete it (results pending)."""
    job = claim_job(factory, "w1", DONE_AT, 60)
    assert job is not None
    rel = result_path(job.id, "SC", uid)
    write_file(root, rel, b"RESULT")
    assert complete_job(factory, job.id, "w1", DONE_AT,
                        [ResultSpec("SC", "1.2.840.10008.5.1.4.1.1.7", uid, str(rel))], 1.0)
    return [root / rel]


def results_of(factory: Factory, study: str) -> list[int]:
    with factory() as s:
        return list(s.scalars(
            select(Result.id).join(Job).join(Study, Job.study_id == Study.id)
            .where(Study.study_uid == study).order_by(Result.id)))


def deliver(factory: Factory, study: str) -> None:
    for result_id in results_of(factory, study):
        assert mark_sent(factory, result_id, DONE_AT)


def delivered_study(factory: Factory, root: Path, study: str) -> list[Path]:
    files = ingest(factory, root, study)
    assert len(dispatch(factory)) == 1
    files += run_job(factory, root, f"{study}.99")
    deliver(factory, study)
    return files


def study_exists(factory: Factory, study: str) -> bool:
    with factory() as s:
        return s.scalar(select(Study.id).where(Study.study_uid == study)) is not None


def count(factory: Factory, table: type[object]) -> int:
    with factory() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def test_delivered_study_past_retention_is_purged(factory: Factory, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    files = delivered_study(factory, tmp_path, "1.2.3")
    kept = delivered_study(factory, tmp_path, "1.2.4")
    with factory.begin() as s:  # the other study completed recently: it stays
        s.execute(update(Study).where(Study.study_uid == "1.2.4")
                  .values(completed_at=LATER - timedelta(days=1),
                          last_received_at=LATER - timedelta(days=1)))
        s.add(AuditEntry(at=T0, actor="local", action="retry", target="job 1", detail=""))
    assert all(f.is_file() for f in files)
    with caplog.at_level(logging.INFO, logger="ainode.retention"):
        report = purge_expired(factory, tmp_path, LATER, DAYS)
    assert [p.study_uid for p in report.purged] == ["1.2.3"]
    purged = report.purged[0]
    assert (purged.series, purged.instances, purged.jobs, purged.results) == (1, 2, 1, 2)
    assert purged.files == 3  # two instances, one result file sent to two destinations
    assert not any(f.exists() for f in files)
    assert not (tmp_path / "instances" / "1.2.3").exists()
    assert not files[-1].parent.exists()  # results/job-N
    assert (tmp_path / "instances").is_dir() and (tmp_path / "results").is_dir()
    assert not study_exists(factory, "1.2.3")
    assert all(f.is_file() for f in kept) and study_exists(factory, "1.2.4")
    assert (count(factory, Series), count(factory, Instance), count(factory, Job),
            count(factory, Result)) == (1, 2, 1, 2)
    assert count(factory, AuditEntry) == 1
    assert "1.2.3" in caplog.text and "2 instances" in caplog.text
    # Nothing left to do on the next run.
    assert purge_expired(factory, tmp_path, LATER, DAYS).purged == ()


def test_retention_zero_purges_nothing(factory: Factory, tmp_path: Path) -> None:
    files = delivered_study(factory, tmp_path, "1.2.3")
    assert purge_expired(factory, tmp_path, LATER + timedelta(days=3650), 0).purged == ()
    assert study_exists(factory, "1.2.3") and all(f.is_file() for f in files)


def test_study_younger_than_retention_is_kept(factory: Factory, tmp_path: Path) -> None:
    files = delivered_study(factory, tmp_path, "1.2.3")
    report = purge_expired(factory, tmp_path, DONE_AT + timedelta(days=DAYS - 0.01), DAYS)
    assert report.purged == () and report.kept == 0
    assert study_exists(factory, "1.2.3") and all(f.is_file() for f in files)
    assert len(purge_expired(factory, tmp_path, DONE_AT + timedelta(days=DAYS + 0.01),
                             DAYS).purged) == 1


def test_pending_or_sending_result_keeps_the_study(factory: Factory, tmp_path: Path) -> None:
    files = ingest(factory, tmp_path, "1.2.3")
    dispatch(factory)
    files += run_job(factory, tmp_path, "1.2.3.99")
    pacs, ris = results_of(factory, "1.2.3")
    assert mark_sent(factory, pacs, DONE_AT)
    report = purge_expired(factory, tmp_path, LATER, DAYS)  # ris still pending
    assert report.purged == () and report.kept == 1
    assert [r.id for r in claim_results(factory, "s1", LATER, 3600)] == [ris]
    report = purge_expired(factory, tmp_path, LATER, DAYS)  # ris sending
    assert report.purged == () and report.kept == 1
    assert study_exists(factory, "1.2.3") and all(f.is_file() for f in files)
    assert mark_sent(factory, ris, LATER)
    assert len(purge_expired(factory, tmp_path, LATER, DAYS).purged) == 1
    assert not any(f.exists() for f in files)


def test_failed_results_are_final(factory: Factory, tmp_path: Path) -> None:
    files = ingest(factory, tmp_path, "1.2.3")
    dispatch(factory)
    files += run_job(factory, tmp_path, "1.2.3.99")
    for result_id in results_of(factory, "1.2.3"):
        mark_send_failed(factory, result_id, DONE_AT, "refused", retry_at=None, max_attempts=1)
    assert len(purge_expired(factory, tmp_path, LATER, DAYS).purged) == 1
    assert not study_exists(factory, "1.2.3") and not any(f.exists() for f in files)


def test_queued_or_running_job_keeps_the_study(factory: Factory, tmp_path: Path) -> None:
    files = ingest(factory, tmp_path, "1.2.3")
    dispatch(factory)
    report = purge_expired(factory, tmp_path, LATER, DAYS)  # queued
    assert report.purged == () and report.kept == 1
    job = claim_job(factory, "w1", LATER, 60)
    assert job is not None
    report = purge_expired(factory, tmp_path, LATER, DAYS)  # running
    assert report.purged == () and report.kept == 1
    assert study_exists(factory, "1.2.3") and all(f.is_file() for f in files)
    fail_job(factory, job.id, "w1", LATER, "boom", retry=False)  # failed is final
    assert len(purge_expired(factory, tmp_path, LATER, DAYS).purged) == 1
    assert not any(f.exists() for f in files)


def test_late_instance_keeps_the_study(factory: Factory, tmp_path: Path) -> None:
    files = delivered_study(factory, tmp_path, "1.2.3")
    files += ingest(factory, tmp_path, "1.2.3", count=1, at=T0 + timedelta(days=2), first=3)
    report = purge_expired(factory, tmp_path, LATER, DAYS)  # series pending again
    assert report.purged == () and report.kept == 1
    assert study_exists(factory, "1.2.3") and all(f.is_file() for f in files)
    with factory.begin() as s:  # even if no series were pending: arrived after completion
        s.execute(update(Series).values(pending=False))
    assert purge_expired(factory, tmp_path, LATER, DAYS).purged == ()
    assert all(f.is_file() for f in files)
    with factory.begin() as s:  # nor a pending series alone (e.g. re-opened by an admin)
        s.execute(update(Series).values(pending=True))
        s.execute(update(Study).values(last_received_at=DONE_AT))
    assert purge_expired(factory, tmp_path, LATER, DAYS).purged == ()
    assert all(f.is_file() for f in files)


def test_file_named_again_by_a_new_row_is_kept(factory: Factory, tmp_path: Path) -> None:
    # The same instance sent again while its study was purged: the new row owns the file.
    files = ingest(factory, tmp_path, "1.2.3", count=1)
    assert remove_files(factory, tmp_path, [str(files[0].relative_to(tmp_path))]) == 0
    assert files[0].is_file()


def test_missing_files_and_shared_folders(factory: Factory, tmp_path: Path) -> None:
    files = delivered_study(factory, tmp_path, "1.2.3")
    files[0].unlink()  # already gone: not an error
    stray = files[1].parent / "other.dcm"  # not ours: the folder stays
    stray.write_bytes(b"x")
    report = purge_expired(factory, tmp_path, LATER, DAYS)
    assert report.purged[0].files == 2 and report.files == 2
    assert stray.is_file() and not files[1].exists()


def test_scheduler_registers_retention_only_when_enabled(factory: Factory,
                                                         tmp_path: Path) -> None:
    def ids(days: float) -> set[str]:
        settings = Settings.model_validate(
            {"storage": {"dir": str(tmp_path), "retention_days": days}})
        return {job.id for job in make_scheduler(settings, factory, lambda: LATER).get_jobs()}

    assert "purge-expired-studies" not in ids(0)
    assert "purge-expired-studies" in ids(7.5)
