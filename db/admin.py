"""Reads for the dashboard, API and CLI, and the admin actions on the queue.

Every read runs in a :func:`db.engine.reading` session (no SQLite write lock).
Every action is one transaction that also writes its :class:`db.audit.AuditEntry`,
so the audit log never misses an action that happened, nor records one that did not.
Records handed out are frozen dataclasses, never live ORM objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Select, case, func, or_, select
from sqlalchemy.orm import Session

from db.audit import AuditEntry, WorkerPresence
from db.engine import reading
from db.errors import Conflict, NotFound
from db.queue import SessionFactory
from db.retention import PurgedStudy, delete_study_rows, lock_study, remove_files
from db.schema import (
    Instance,
    Job,
    JobStatus,
    Result,
    ResultKind,
    ResultStatus,
    Series,
    Study,
)

MAX_PER_PAGE = 200
PRESENCE_EVERY = timedelta(seconds=5)
PRESENCE_STALE = timedelta(seconds=30)


# --- records ----------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    id: int
    status: str
    model: str
    route: str
    modality: str
    study_uid: str
    series_uid: str
    accession_number: str | None
    series_description: str
    destinations: list[str]
    attempts: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    inference_seconds: float | None
    lease_owner: str | None
    last_error: str | None


@dataclass(frozen=True)
class Page:
    items: list[Any]
    total: int
    page: int
    per_page: int


@dataclass(frozen=True)
class TimelineEvent:
    event: str
    at: datetime
    detail: str = ""


@dataclass(frozen=True)
class ResultRow:
    id: int
    job_id: int
    destination: str
    kind: ResultKind
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    status: str
    attempts: int
    created_at: datetime
    sent_at: datetime | None
    last_error: str | None
    warning_status: int | None = None
    """The destination stored it with this warning status (e.g. 0xB000 = 45056)."""
    warning: str | None = None


@dataclass(frozen=True)
class JobDetail:
    job: JobRow
    timeline: list[TimelineEvent]
    results: list[ResultRow]


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    modality: str
    series_description: str
    series_number: int | None
    instance_count: int
    last_received_at: datetime


@dataclass(frozen=True)
class StudyRow:
    id: int
    study_uid: str
    accession_number: str | None
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    jobs: int
    series: list[SeriesRow] = field(default_factory=list)
    quarantine_reason: str | None = None
    """Why its jobs could not be planned; None when the study is not quarantined."""
    quarantined_at: datetime | None = None


@dataclass(frozen=True)
class WorkerRow:
    owner: str
    pid: int
    device: str
    started_at: datetime
    seen_at: datetime
    alive: bool
    job_id: int | None


@dataclass(frozen=True)
class DestinationStats:
    name: str
    pending: int
    sent: int
    failed: int
    last_sent_at: datetime | None
    last_echo_at: datetime | None
    last_echo_ok: bool | None
    last_echo_message: str


@dataclass(frozen=True)
class Summary:
    jobs_by_status: dict[str, int]
    studies_last_hour: int
    studies_last_day: int
    results_sent_last_hour: int
    results_sent_last_day: int
    oldest_queued_job_id: int | None
    oldest_queued_age_seconds: float | None
    workers: list[WorkerRow]
    studies_quarantined: int = 0
    """Studies whose planning failed, waiting for an admin to retry or delete them."""


@dataclass(frozen=True)
class ModelStats:
    model: str
    jobs: int
    done: int
    failed: int
    average_inference_seconds: float | None


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: str


@dataclass(frozen=True)
class JobFilter:
    status: str | None = None
    model: str | None = None
    modality: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    text: str | None = None
    """Substring of the study or series UID or the accession number."""


# --- reads ------------------------------------------------------------------


def _job_query() -> Select[Job, Series, Study]:
    return (select(Job, Series, Study).join(Series, Job.series_id == Series.id)
            .join(Study, Job.study_id == Study.id))


def _job_row(job: Job, series: Series, study: Study) -> JobRow:
    return JobRow(
        id=job.id, status=job.status.value, model=job.model, route=job.route,
        modality=series.modality, study_uid=study.study_uid, series_uid=series.series_uid,
        accession_number=study.accession_number, series_description=series.series_description,
        destinations=list(job.destinations), attempts=job.attempts,
        max_attempts=job.max_attempts, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at, inference_seconds=job.inference_seconds,
        lease_owner=job.lease_owner, last_error=job.last_error)


def _bounds(page: int, per_page: int) -> tuple[int, int]:
    return max(page, 1), min(max(per_page, 1), MAX_PER_PAGE)


def list_jobs(factory: SessionFactory, filters: JobFilter, page: int = 1,
              per_page: int = 50) -> Page:
    """Jobs matching ``filters``, newest first."""
    page, per_page = _bounds(page, per_page)
    query = _job_query()
    if filters.status:
        query = query.where(Job.status == JobStatus(filters.status))
    if filters.model:
        query = query.where(Job.model == filters.model)
    if filters.modality:
        query = query.where(Series.modality == filters.modality)
    if filters.created_from:
        query = query.where(Job.created_at >= filters.created_from)
    if filters.created_to:
        query = query.where(Job.created_at < filters.created_to)
    if filters.text:
        text = filters.text.strip()
        query = query.where(or_(Study.study_uid.contains(text, autoescape=True),
                                Series.series_uid.contains(text, autoescape=True),
                                Study.accession_number.contains(text, autoescape=True)))
    with reading(factory) as s:
        total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = s.execute(query.order_by(Job.id.desc()).offset((page - 1) * per_page)
                         .limit(per_page)).all()
        return Page([_job_row(*row) for row in rows], total, page, per_page)


def _result_row(r: Result) -> ResultRow:
    return ResultRow(id=r.id, job_id=r.job_id, destination=r.destination, kind=r.kind,
                     sop_class_uid=r.sop_class_uid, sop_instance_uid=r.sop_instance_uid,
                     path=r.path, status=r.status.value, attempts=r.attempts,
                     created_at=r.created_at, sent_at=r.sent_at, last_error=r.last_error,
                     warning_status=r.warning_status, warning=r.warning)


def _timeline(job: Job, series: Series, study: Study, results: list[Result]
              ) -> list[TimelineEvent]:
    events = [TimelineEvent("received", study.first_received_at, "first instance of the study"),
              TimelineEvent("last instance", series.last_received_at,
                            f"{series.instance_count} instance(s) in the series")]
    if study.completed_at is not None:
        events.append(TimelineEvent("complete", study.completed_at, "study quiet: complete"))
    events.append(TimelineEvent("queued", job.created_at, f"route {job.route}"))
    if job.started_at is not None:
        events.append(TimelineEvent("running", job.started_at, f"attempt {job.attempts}"))
    if job.finished_at is not None:
        events.append(TimelineEvent(job.status.value, job.finished_at, job.last_error or ""))
    for r in results:
        if r.sent_at is not None:
            events.append(TimelineEvent("sent", r.sent_at, f"{r.kind} to {r.destination}"))
    return sorted(events, key=lambda e: e.at)


def job_detail(factory: SessionFactory, job_id: int) -> JobDetail:
    with reading(factory) as s:
        row = s.execute(_job_query().where(Job.id == job_id)).first()
        if row is None:
            raise NotFound(f"job {job_id} not found")
        job, series, study = row
        results = list(s.scalars(select(Result).where(Result.job_id == job_id)
                                 .order_by(Result.id)))
        return JobDetail(_job_row(job, series, study), _timeline(job, series, study, results),
                         [_result_row(r) for r in results])


def get_result(factory: SessionFactory, result_id: int) -> ResultRow:
    with reading(factory) as s:
        result = s.get(Result, result_id)
        if result is None:
            raise NotFound(f"result {result_id} not found")
        return _result_row(result)


def list_studies(factory: SessionFactory, text: str | None = None, page: int = 1,
                 per_page: int = 50, *, quarantined: bool = False) -> Page:
    """Studies, newest first, each with its series, instance counts and quarantine.

    With ``quarantined`` only the quarantined studies (planning failed).
    """
    page, per_page = _bounds(page, per_page)
    query = select(Study)
    if quarantined:
        query = query.where(Study.quarantined_at.is_not(None))
    if text:
        query = query.where(or_(Study.study_uid.contains(text.strip(), autoescape=True),
                                Study.accession_number.contains(text.strip(), autoescape=True)))
    with reading(factory) as s:
        total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
        studies = s.scalars(query.order_by(Study.last_received_at.desc(), Study.id.desc())
                            .offset((page - 1) * per_page).limit(per_page)).all()
        ids = [st.id for st in studies]
        series = s.scalars(select(Series).where(Series.study_id.in_(ids))
                           .order_by(Series.series_number, Series.id)).all()
        jobs = dict(s.execute(select(Job.study_id, func.count()).where(Job.study_id.in_(ids))
                              .group_by(Job.study_id)).all())
        by_study: dict[int, list[SeriesRow]] = {i: [] for i in ids}
        for se in series:
            by_study[se.study_id].append(SeriesRow(
                series_uid=se.series_uid, modality=se.modality,
                series_description=se.series_description, series_number=se.series_number,
                instance_count=se.instance_count, last_received_at=se.last_received_at))
        items = [StudyRow(id=st.id, study_uid=st.study_uid, accession_number=st.accession_number,
                          first_received_at=st.first_received_at,
                          last_received_at=st.last_received_at, completed_at=st.completed_at,
                          jobs=jobs.get(st.id, 0), series=by_study[st.id],
                          quarantine_reason=st.quarantine_reason,
                          quarantined_at=st.quarantined_at) for st in studies]
        return Page(items, total, page, per_page)


def _workers(s: Session, now: datetime) -> list[WorkerRow]:
    running = dict(s.execute(select(Job.lease_owner, Job.id).where(
        Job.status == JobStatus.RUNNING, Job.lease_expires_at >= now)).all())
    rows = s.scalars(select(WorkerPresence).order_by(WorkerPresence.owner)).all()
    out = []
    for w in rows:
        job_id = running.get(w.owner)
        alive = w.seen_at >= now - PRESENCE_STALE or job_id is not None
        out.append(WorkerRow(owner=w.owner, pid=w.pid, device=w.device, started_at=w.started_at,
                             seen_at=w.seen_at, alive=alive, job_id=job_id))
    return out


def workers(factory: SessionFactory, now: datetime) -> list[WorkerRow]:
    """Workers that reported in, alive when seen lately or holding a live lease."""
    with reading(factory) as s:
        return _workers(s, now)


def summary(factory: SessionFactory, now: datetime) -> Summary:
    hour, day = now - timedelta(hours=1), now - timedelta(days=1)
    with reading(factory) as s:
        counts = {st.value: 0 for st in JobStatus}
        for status, n in s.execute(select(Job.status, func.count()).group_by(Job.status)):
            counts[status.value] = n

        def studies_since(t: datetime) -> int:
            return s.scalar(select(func.count()).where(Study.first_received_at >= t)) or 0

        def sent_since(t: datetime) -> int:
            return s.scalar(select(func.count()).where(Result.sent_at >= t)) or 0

        oldest = s.execute(select(Job.id, Job.created_at).where(Job.status == JobStatus.QUEUED)
                           .order_by(Job.created_at, Job.id).limit(1)).first()
        quarantined = s.scalar(select(func.count()).where(Study.quarantined_at.is_not(None)))
        return Summary(
            jobs_by_status=counts, studies_last_hour=studies_since(hour),
            studies_last_day=studies_since(day), results_sent_last_hour=sent_since(hour),
            results_sent_last_day=sent_since(day),
            oldest_queued_job_id=oldest[0] if oldest else None,
            oldest_queued_age_seconds=(now - oldest[1]).total_seconds() if oldest else None,
            workers=_workers(s, now), studies_quarantined=quarantined or 0)


def destination_stats(factory: SessionFactory, names: list[str]) -> list[DestinationStats]:
    """Outbox counts and the last recorded C-ECHO for each destination in ``names``."""
    with reading(factory) as s:
        counts: dict[tuple[str, ResultStatus], int] = {
            (d, st): n for d, st, n in s.execute(
                select(Result.destination, Result.status, func.count())
                .group_by(Result.destination, Result.status))}
        last_sent = dict(s.execute(select(Result.destination, func.max(Result.sent_at))
                                   .group_by(Result.destination)).all())
        out = []
        for name in names:
            echo = s.scalars(select(AuditEntry).where(AuditEntry.action == "echo",
                                                      AuditEntry.target == f"destination {name}")
                             .order_by(AuditEntry.id.desc()).limit(1)).first()
            out.append(DestinationStats(
                name=name, pending=counts.get((name, ResultStatus.PENDING), 0),
                sent=counts.get((name, ResultStatus.SENT), 0),
                failed=counts.get((name, ResultStatus.FAILED), 0),
                last_sent_at=last_sent.get(name),
                last_echo_at=echo.at if echo else None,
                last_echo_ok=echo.detail.startswith("ok") if echo else None,
                last_echo_message=echo.detail if echo else ""))
        return out


def model_stats(factory: SessionFactory) -> dict[str, ModelStats]:
    """Per model: jobs, done, failed and the average inference time of done jobs."""
    with reading(factory) as s:
        rows = s.execute(select(
            Job.model, func.count(), func.sum(case((Job.status == JobStatus.DONE, 1), else_=0)),
            func.sum(case((Job.status == JobStatus.FAILED, 1), else_=0)),
            func.avg(Job.inference_seconds)).group_by(Job.model)).all()
        return {m: ModelStats(m, n, int(done or 0), int(failed or 0),
                              float(avg) if avg is not None else None)
                for m, n, done, failed, avg in rows}


def audit_log(factory: SessionFactory, limit: int = 100) -> list[AuditRow]:
    with reading(factory) as s:
        rows = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())
                         .limit(min(max(limit, 1), 1000))).all()
        return [AuditRow(r.id, r.at, r.actor, r.action, r.target, r.detail) for r in rows]


# --- metrics samples ----------------------------------------------------------


@dataclass(frozen=True)
class MetricSamples:
    """Raw values the Prometheus collector turns into metric families at scrape time."""

    jobs_by_status: dict[str, int]
    instances: int
    bytes: int
    inference_seconds: dict[str, list[float]]
    queue_wait_seconds: list[float]
    turnaround_seconds: list[float]
    send_failures: dict[str, int]
    oldest_queued_age_seconds: float


def metric_samples(factory: SessionFactory, now: datetime) -> MetricSamples:
    """Everything the metrics need, read from the database (correct across worker processes)."""
    with reading(factory) as s:
        counts = {st.value: 0 for st in JobStatus}
        for status, n in s.execute(select(Job.status, func.count()).group_by(Job.status)):
            counts[status.value] = n
        instances, size = s.execute(select(func.count(), func.coalesce(func.sum(Instance.size),
                                                                       0))).one()
        inference: dict[str, list[float]] = {}
        for model, seconds in s.execute(select(Job.model, Job.inference_seconds)
                                        .where(Job.inference_seconds.is_not(None))):
            inference.setdefault(model, []).append(float(seconds or 0.0))
        waits = [(started - created).total_seconds() for created, started in s.execute(
            select(Job.created_at, Job.started_at).where(Job.started_at.is_not(None)))
            if started is not None]
        turnaround = [(sent - received).total_seconds() for received, sent in s.execute(
            select(Series.last_received_at, Result.sent_at)
            .join(Job, Result.job_id == Job.id).join(Series, Job.series_id == Series.id)
            .where(Result.sent_at.is_not(None))) if sent is not None]
        # Failed attempts: every attempt counts, except the one a sent result succeeded with.
        failures = {dest: int(attempts or 0) - int(sent or 0) for dest, attempts, sent in s.execute(
            select(Result.destination, func.sum(Result.attempts),
                   func.sum(case((Result.status == ResultStatus.SENT, 1), else_=0)))
            .group_by(Result.destination))}
        oldest = s.scalar(select(func.min(Job.created_at)).where(Job.status == JobStatus.QUEUED))
        return MetricSamples(
            jobs_by_status=counts, instances=int(instances), bytes=int(size),
            inference_seconds=inference, queue_wait_seconds=waits, turnaround_seconds=turnaround,
            send_failures=failures,
            oldest_queued_age_seconds=(now - oldest).total_seconds() if oldest else 0.0)


# --- actions ----------------------------------------------------------------


def _audit(s: Session, now: datetime, actor: str, action: str, target: str,
           detail: str = "") -> None:
    s.add(AuditEntry(at=now, actor=actor[:128], action=action, target=target[:128],
                     detail=detail[:2000]))


def _job_for_update(s: Session, job_id: int) -> Job:
    job = s.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.SKIPPED})
CANCELLABLE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


def _change_status(s: Session, job_id: int, allowed: frozenset[JobStatus], to: JobStatus,
                   refusal: str, action: str, actor: str, now: datetime) -> Job:
    """Move a job from one of ``allowed`` to ``to``, audited; else :class:`Conflict`."""
    job = _job_for_update(s, job_id)
    if job.status not in allowed:
        raise Conflict(f"job {job_id} is {job.status.value}: {refusal}")
    _audit(s, now, actor, action, f"job {job_id}", f"was {job.status.value}")
    job.status = to
    return job


def retry_job(factory: SessionFactory, job_id: int, actor: str, now: datetime) -> None:
    """Queue a failed, cancelled or skipped job again with fresh attempts."""
    with factory.begin() as s:
        job = _change_status(s, job_id, RETRYABLE, JobStatus.QUEUED,
                             "only failed, cancelled or skipped jobs can be retried "
                             "(use re-send for a done job)", "retry", actor, now)
        job.attempts = 0
        job.not_before = None
        job.started_at = None
        job.finished_at = None
        job.last_error = None


def cancel_job(factory: SessionFactory, job_id: int, actor: str, now: datetime) -> None:
    """Cancel a queued or running job (a running job's worker loses its lease fence)."""
    with factory.begin() as s:
        job = _change_status(s, job_id, CANCELLABLE, JobStatus.CANCELLED,
                             "only queued or running jobs can be cancelled", "cancel", actor, now)
        job.finished_at = now
        job.lease_owner = None
        job.lease_expires_at = None


def resend_job(factory: SessionFactory, job_id: int, destination: str, actor: str,
               now: datetime) -> int:
    """Queue every object a done job produced for ``destination`` again; return how many."""
    with factory.begin() as s:
        job = _job_for_update(s, job_id)
        results = list(s.scalars(select(Result).where(Result.job_id == job_id)
                                 .order_by(Result.id)))
        if job.status is not JobStatus.DONE or not results:
            raise Conflict(f"job {job_id} is {job.status.value} with {len(results)} result(s): "
                           "only a done job's results can be re-sent")
        objects: dict[str, Result] = {}
        for r in results:
            objects.setdefault(r.sop_instance_uid, r)
        existing = {r.sop_instance_uid: r for r in results if r.destination == destination}
        for uid, proto in objects.items():
            row = existing.get(uid)
            if row is None:
                s.add(Result(job_id=job_id, destination=destination, kind=proto.kind,
                             sop_class_uid=proto.sop_class_uid, sop_instance_uid=uid,
                             path=proto.path, status=ResultStatus.PENDING, attempts=0,
                             next_attempt_at=now, created_at=now))
            else:
                row.status = ResultStatus.PENDING
                row.attempts = 0
                row.next_attempt_at = now
                row.sent_at = None
                row.last_error = None
        _audit(s, now, actor, "resend", f"job {job_id}",
               f"{len(objects)} object(s) to {destination}")
        return len(objects)


def _quarantined_study(study: Study | None, study_id: int, refusal: str) -> Study:
    """``study`` when it exists and is quarantined; else :class:`NotFound` or :class:`Conflict`."""
    if study is None:
        raise NotFound(f"study {study_id} not found")
    if study.quarantined_at is None:
        raise Conflict(f"study {study_id} is not quarantined: {refusal}")
    return study


def retry_study(factory: SessionFactory, study_id: int, actor: str, now: datetime) -> None:
    """Lift a study's quarantine: the next completion sweep plans its jobs again."""
    with factory.begin() as s:
        study = _quarantined_study(s.get(Study, study_id), study_id,
                                   "only a quarantined study can be retried")
        _audit(s, now, actor, "retry", f"study {study_id}",
               f"{study.study_uid} was quarantined: {study.quarantine_reason or ''}")
        study.quarantine_reason = None
        study.quarantined_at = None


def delete_study(factory: SessionFactory, root: Path, study_id: int, actor: str,
                 now: datetime) -> PurgedStudy:
    """Delete a quarantined study: its rows, then its instance and result files.

    ``root`` is the storage folder. Its queued jobs and pending results go with it; a
    study with a job running or a result being sent is refused (:class:`Conflict`)
    until that is over. The rows and the audit entry are one transaction; the files
    are removed after it, as retention does (``db.retention``).
    """
    with factory.begin() as s:
        rows = lock_study(s, study_id)
        study = _quarantined_study(None if rows is None else rows.study, study_id,
                                   "only a quarantined study can be deleted")
        assert rows is not None
        reason = study.quarantine_reason or ""
        busy = ([f"job {j.id} running" for j in rows.jobs if j.status is JobStatus.RUNNING]
                + [f"result {r.id} being sent" for r in rows.results
                   if r.status is ResultStatus.SENDING])
        if busy:
            raise Conflict(f"study {study_id} is in work ({', '.join(busy[:5])}): "
                           "cancel its jobs or wait, then delete it")
        done = delete_study_rows(s, rows)
        _audit(s, now, actor, "delete", f"study {study_id}",
               f"{done.study_uid} ({done.series} series, {done.instances} instances, "
               f"{done.jobs} jobs, {done.results} results) was quarantined: {reason}")
    files = remove_files(factory, root, done.paths)
    return PurgedStudy(study_uid=done.study_uid, series=done.series, instances=done.instances,
                       jobs=done.jobs, results=done.results, files=files)


def record_echo(factory: SessionFactory, destination: str, ok: bool, message: str, actor: str,
                now: datetime) -> None:
    """Write a C-ECHO outcome to the audit log (the dashboard shows the last per destination)."""
    with factory.begin() as s:
        _audit(s, now, actor, "echo", f"destination {destination}",
               f"{'ok' if ok else 'failed'}: {message}")


def record_action(factory: SessionFactory, actor: str, action: str, target: str, detail: str,
                  now: datetime) -> None:
    """Write an audit entry for an action done outside the queue (e.g. a login failure)."""
    with factory.begin() as s:
        _audit(s, now, actor, action, target, detail)


# --- worker presence ------------------------------------------------------------


def report_presence(factory: SessionFactory, owner: str, pid: int, device: str,
                    now: datetime) -> None:
    """Record that a worker is alive; writes at most every few seconds (reads otherwise)."""
    with reading(factory) as s:
        seen = s.scalar(select(WorkerPresence.seen_at).where(WorkerPresence.owner == owner))
    if seen is not None and seen > now - PRESENCE_EVERY:
        return
    with factory.begin() as s:
        row = s.get(WorkerPresence, owner)
        if row is None:
            s.add(WorkerPresence(owner=owner, pid=pid, device=device[:32], started_at=now,
                                 seen_at=now))
        else:
            row.seen_at = now
            row.device = device[:32]


def forget_stale_workers(factory: SessionFactory, now: datetime,
                         older_than: timedelta = timedelta(days=1)) -> int:
    """Drop presence rows of workers not seen for ``older_than``."""
    with factory.begin() as s:
        rows = s.scalars(select(WorkerPresence)
                         .where(WorkerPresence.seen_at < now - older_than)).all()
        for row in rows:
            s.delete(row)
        return len(rows)
