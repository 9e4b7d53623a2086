"""Retention: delete finished studies (rows and files) some days after completion.

A study is purged only when nothing about it is still in work or undelivered:
no series pending (an instance that no run covered yet), no job queued or
running, no result pending or sending (``sent`` and ``failed`` are final), and
no instance received after the study was completed.

Each study is purged in its own write transaction that re-checks those
conditions with the study's rows locked (SQLite: the IMMEDIATE transaction;
PostgreSQL: ``FOR UPDATE``), so a late instance, a dispatch or an admin retry
either happens before (and the study is kept) or finds the rows gone. The rows
go first, the files after the commit: a crash in between leaves only orphan
files, never a row pointing to a missing file. A file is not removed when a row
(recorded meanwhile, e.g. the same instance re-sent) names it again. Audit rows
are kept.

The deletion of one study (:func:`lock_study`, :func:`delete_study_rows`, then
:func:`remove_files` after the commit) is shared with the admin's deletion of a
quarantined study (``db.admin.delete_study``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from db.engine import reading
from db.schema import Instance, Job, JobStatus, Result, ResultStatus, Series, Study

log = logging.getLogger("ainode.retention")

SessionFactory = sessionmaker[Session]
ACTIVE_JOBS = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
UNDELIVERED = frozenset({ResultStatus.PENDING, ResultStatus.SENDING})


@dataclass(frozen=True)
class PurgedStudy:
    """What was deleted for one study (UIDs and counts only: no patient data)."""

    study_uid: str
    series: int
    instances: int
    jobs: int
    results: int
    files: int
    """Files actually removed (missing ones, or ones named again by a new row, are not counted)."""


@dataclass(frozen=True)
class PurgeReport:
    purged: tuple[PurgedStudy, ...] = ()
    kept: int = 0
    """Studies past the retention period but still in work or undelivered."""

    @property
    def files(self) -> int:
        return sum(p.files for p in self.purged)


def _is_postgresql(s: Session) -> bool:
    return s.bind is not None and s.bind.dialect.name == "postgresql"


def purge_expired(factory: SessionFactory, root: Path, now: datetime,
                  retention_days: float) -> PurgeReport:
    """Delete studies completed more than ``retention_days`` before ``now`` (0: keep all).

    ``root`` is the storage folder that instance and result paths are relative to.
    """
    if retention_days <= 0:
        return PurgeReport()
    cutoff = now - timedelta(days=retention_days)
    with reading(factory) as s:
        candidates = list(s.scalars(
            select(Study.id)
            .where(Study.completed_at.is_not(None), Study.completed_at < cutoff)
            .order_by(Study.id)
        ))
    purged: list[PurgedStudy] = []
    kept = 0
    for study_id in candidates:
        done = _purge_rows(factory, study_id, cutoff)
        if done is None:
            kept += 1
            continue
        uid, counts, paths = done
        files = remove_files(factory, root, paths)
        report = PurgedStudy(study_uid=uid, series=counts[0], instances=counts[1],
                             jobs=counts[2], results=counts[3], files=files)
        log.info("retention: purged study %s (%d series, %d instances, %d jobs, %d results, "
                 "%d files)", uid, report.series, report.instances, report.jobs,
                 report.results, report.files)
        purged.append(report)
    return PurgeReport(purged=tuple(purged), kept=kept)


@dataclass(frozen=True)
class StudyRows:
    """One study's rows, locked for a write transaction (PostgreSQL: ``FOR UPDATE``)."""

    study: Study
    series: list[Series]
    jobs: list[Job]
    results: list[Result]


@dataclass(frozen=True)
class DeletedRows:
    """What :func:`delete_study_rows` deleted: the UID, counts, and the files to remove."""

    study_uid: str
    series: int
    instances: int
    jobs: int
    results: int
    paths: list[str]


def lock_study(s: Session, study_id: int) -> StudyRows | None:
    """Load one study with its series, jobs and results, locked; None when it is gone."""
    lock = _is_postgresql(s)
    study = s.get(Study, study_id, with_for_update=lock)
    if study is None:
        return None
    series_q = select(Series).where(Series.study_id == study_id)
    jobs_q = select(Job).where(Job.study_id == study_id)
    series = list(s.scalars(series_q.with_for_update() if lock else series_q))
    jobs = list(s.scalars(jobs_q.with_for_update() if lock else jobs_q))
    results_q = select(Result).where(Result.job_id.in_([job.id for job in jobs]))
    results = list(s.scalars(results_q.with_for_update() if lock else results_q))
    return StudyRows(study, series, jobs, results)


def delete_study_rows(s: Session, rows: StudyRows) -> DeletedRows:
    """Delete a locked study's rows (results, jobs, instances, series, the study).

    The caller commits, then removes the returned paths with :func:`remove_files`.
    """
    study_id = rows.study.id
    job_ids = [job.id for job in rows.jobs]
    series_ids = [row.id for row in rows.series]
    instance_paths = list(s.scalars(
        select(Instance.path).where(Instance.series_id.in_(series_ids))))
    uid = rows.study.study_uid
    s.execute(delete(Result).where(Result.job_id.in_(job_ids)))
    s.execute(delete(Job).where(Job.study_id == study_id))
    s.execute(delete(Instance).where(Instance.series_id.in_(series_ids)))
    s.execute(delete(Series).where(Series.study_id == study_id))
    s.execute(delete(Study).where(Study.id == study_id))
    return DeletedRows(uid, len(series_ids), len(instance_paths), len(job_ids),
                       len(rows.results), instance_paths + [r.path for r in rows.results])


def _purge_rows(factory: SessionFactory, study_id: int, cutoff: datetime
                ) -> tuple[str, tuple[int, int, int, int], list[str]] | None:
    """Delete one study's rows if it is still purgeable; return its UID, counts and paths."""
    with factory.begin() as s:
        rows = lock_study(s, study_id)
        if rows is None:
            return None
        study = rows.study
        if (study.completed_at is None or study.completed_at >= cutoff
                or study.last_received_at > study.completed_at):
            return None
        if (any(row.pending for row in rows.series)
                or any(j.status in ACTIVE_JOBS for j in rows.jobs)
                or any(r.status in UNDELIVERED for r in rows.results)):
            return None
        done = delete_study_rows(s, rows)
        return (done.study_uid, (done.series, done.instances, done.jobs, done.results),
                done.paths)


def remove_files(factory: SessionFactory, root: Path, paths: Iterable[str]) -> int:
    """Remove deleted rows' files (and folders left empty); return how many were removed.

    Call it after the deleting transaction committed. ``root`` is the storage folder.
    """
    wanted = sorted(set(paths))
    if not wanted:
        return 0
    with reading(factory) as s:
        # A row recorded since the purge (e.g. the same instance sent again) owns its file.
        claimed = set(s.scalars(select(Instance.path).where(Instance.path.in_(wanted))))
        claimed |= set(s.scalars(select(Result.path).where(Result.path.in_(wanted))))
    base = root.resolve()
    removed = 0
    folders: set[Path] = set()
    for rel in wanted:
        if rel in claimed:
            continue
        path = (base / rel).resolve()
        if not path.is_relative_to(base) or path == base:
            log.warning("deleting files: skipped a path outside the storage folder")
            continue
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("deleting files: cannot remove %s: %s", rel, exc.strerror)
            continue
        folders.update(p for p in path.parents if p.is_relative_to(base) and p != base)
    _remove_empty(base, folders)
    return removed


def _remove_empty(base: Path, folders: set[Path]) -> None:
    """Remove the folders that are now empty, deepest first; keep the top-level ones."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if len(folder.relative_to(base).parts) < 2:
            continue  # instances/ and results/ themselves stay
        with contextlib.suppress(OSError):  # not empty (a file written meanwhile) or gone
            os.rmdir(folder)
