"""Queue operations. Each public function is one transaction on a session factory.

Records returned to callers are frozen dataclasses, never live ORM objects.
Job claims are atomic: a compare-and-set UPDATE on the job's status (and on
PostgreSQL a ``FOR UPDATE SKIP LOCKED`` select), so two workers never run the
same job. Every transition of a running job is fenced by its lease owner, so a
worker whose lease expired cannot overwrite the outcome of the run that replaced it.
Outgoing results are claimed the same way (status ``sending`` with a lease), so
several nodes sharing one PostgreSQL database never send one result twice.

On SQLite every write transaction begins IMMEDIATE and so runs alone; on
PostgreSQL (READ COMMITTED) read-then-write transactions lock the rows they
read (``FOR UPDATE``), which serialises them per row.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Executable,
    Select,
    and_,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db.engine import reading
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

SessionFactory = sessionmaker[Session]
_Q = TypeVar("_Q", bound="Select[Any]")
INGEST_RETRIES = 5


@dataclass(frozen=True)
class InstanceMeta:
    """What the SCP records for a stored instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    calling_ae: str
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    series_number: int | None = None
    accession_number: str | None = None


@dataclass(frozen=True)
class SeriesInfo:
    """A series as the router sees it."""

    id: int
    study_id: int
    series_uid: str
    modality: str
    sop_class_uid: str
    body_part: str
    series_description: str
    run: int


@dataclass(frozen=True)
class JobPlan:
    """A job to create: one per (series, model)."""

    series_id: int
    model: str
    route: str
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class JobRecord:
    id: int
    series_id: int
    study_id: int
    series_uid: str
    study_uid: str
    model: str
    route: str
    destinations: tuple[str, ...]
    run: int
    uid_seed: str
    status: JobStatus
    attempts: int
    max_attempts: int
    lease_owner: str | None


@dataclass(frozen=True)
class ResultSpec:
    """A produced object to deliver to each of the job's destinations."""

    kind: ResultKind
    sop_class_uid: str
    sop_instance_uid: str
    path: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ResultKind(self.kind))  # also accepts its value


@dataclass(frozen=True)
class ResultRecord:
    id: int
    job_id: int
    destination: str
    kind: ResultKind
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    status: ResultStatus
    attempts: int


@dataclass(frozen=True)
class StoreWarning:
    """A destination stored an object but answered with a warning status (0xBxxx)."""

    status: int
    text: str


def _is_postgresql(s: Session) -> bool:
    return s.bind is not None and s.bind.dialect.name == "postgresql"


def _locked(s: Session, query: _Q, *, skip_locked: bool = False) -> _Q:
    """``query`` with ``FOR UPDATE`` on PostgreSQL (SQLite's IMMEDIATE transactions need none)."""
    return query.with_for_update(skip_locked=skip_locked) if _is_postgresql(s) else query


# --- ingest -----------------------------------------------------------------


def record_instance(factory: SessionFactory, meta: InstanceMeta, now: datetime) -> bool:
    """Record a stored instance; return False when its SOP Instance UID was already known.

    Creates the study and series on first sight; marks the series pending so the
    stability sweep (re)evaluates it, also when the study was already processed.
    Concurrent receivers (threads, or nodes sharing PostgreSQL) may both create the
    same study or series: the loser's unique-constraint error is retried once the
    winner's row is visible.
    """
    return record_instances(factory, [meta], now)[0]


def record_instances(factory: SessionFactory, metas: Sequence[InstanceMeta], now: datetime,
                     before_commit: Callable[[list[bool]], None] | None = None) -> list[bool]:
    """Record a batch of stored instances in one transaction (see :func:`record_instance`).

    A handful of statements per batch, whatever its size: one lookup of the SOP
    Instance UIDs already known, one of the studies and one of the series
    involved, and one multi-row insert of the new instances. ``before_commit``
    gets which instances are new before the rows become visible (the ingest
    writes their files then); it may run again if the transaction is retried.
    """
    for attempt in range(INGEST_RETRIES):
        try:
            with factory.begin() as s:
                flags = _add_instances(s, metas, now)
                if before_commit is not None:
                    before_commit(flags)
                return flags
        except IntegrityError:
            if attempt == INGEST_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def _add_instances(s: Session, metas: Sequence[InstanceMeta], now: datetime) -> list[bool]:
    known = set(s.scalars(select(Instance.sop_uid).where(
        Instance.sop_uid.in_({m.sop_uid for m in metas}))))
    fresh: list[InstanceMeta] = []
    flags: list[bool] = []
    for meta in metas:
        new = meta.sop_uid not in known
        known.add(meta.sop_uid)
        flags.append(new)
        if new:
            fresh.append(meta)
    if not fresh:
        return flags
    studies = {st.study_uid: st for st in s.scalars(_locked(s, select(Study).where(
        Study.study_uid.in_({m.study_uid for m in fresh}))))}
    series = {se.series_uid: se for se in s.scalars(_locked(s, select(Series).where(
        Series.series_uid.in_({m.series_uid for m in fresh}))))}
    for meta in fresh:
        study = studies.get(meta.study_uid)
        if study is None:
            study = studies[meta.study_uid] = Study(
                study_uid=meta.study_uid, accession_number=meta.accession_number,
                first_received_at=now, last_received_at=now, runs=0)
            s.add(study)
        study.last_received_at = now
        one = series.get(meta.series_uid)
        if one is None:
            one = series[meta.series_uid] = Series(
                study=study, series_uid=meta.series_uid, modality=meta.modality,
                sop_class_uid=meta.sop_class_uid, body_part=meta.body_part,
                series_description=meta.series_description, series_number=meta.series_number,
                instance_count=0, last_received_at=now, pending=True, runs=0)
            s.add(one)
        one.instance_count += 1
        one.last_received_at = now
        one.pending = True
    s.flush()  # ids for new studies and series
    s.execute(insert(Instance), [
        {"series_id": series[m.series_uid].id, "sop_uid": m.sop_uid,
         "sop_class_uid": m.sop_class_uid, "transfer_syntax": m.transfer_syntax,
         "path": m.path, "size": m.size, "calling_ae": m.calling_ae, "received_at": now}
        for m in fresh])
    return flags


def instance_known(factory: SessionFactory, sop_uid: str) -> bool:
    with reading(factory) as s:
        return s.scalar(select(Instance.id).where(Instance.sop_uid == sop_uid)) is not None


# --- study completion and routing ---------------------------------------------


def dispatch_stable_studies(
    factory: SessionFactory,
    now: datetime,
    stable_seconds: Callable[[Sequence[str]], float],
    plan: Callable[[SeriesInfo], list[JobPlan]],
    max_attempts: int,
    held: Collection[str] = (),
    problems: dict[str, str] | None = None,
) -> list[int]:
    """Complete every study quiet for long enough and queue its jobs.

    ``stable_seconds(modalities)`` gives the quiet period of a study from the
    modalities of its series; ``plan(series)`` evaluates the routes (it may read
    files, so it runs outside any write transaction). Each study is then completed
    in its own transaction, unless an instance arrived meanwhile. Returns the ids
    of the jobs created.

    Studies in ``held`` (UIDs: instances received but not yet recorded) are not
    completed now. A study whose planning raises is quarantined in its own transaction
    (its series stay pending; ``quarantine_reason`` and ``quarantined_at`` set) and its
    reason put in ``problems`` (study UID -> reason); the other studies go on.
    Quarantined studies are left out of every later sweep, also when more instances
    arrive for them, until an admin retries them (``db.admin.retry_study``).
    """
    with reading(factory) as s:
        studies = s.scalars(
            select(Study)
            .where(Study.id.in_(select(Series.study_id).where(Series.pending.is_(True))),
                   Study.quarantined_at.is_(None))
        ).all()
        work: list[tuple[int, datetime, list[tuple[SeriesInfo, list[JobPlan]]]]] = []
        uids: dict[int, str] = {}
        for study in studies:
            if study.study_uid in held:
                continue
            rows = s.scalars(select(Series).where(Series.study_id == study.id)).all()
            quiet = stable_seconds([row.modality for row in rows])
            if study.last_received_at > now - timedelta(seconds=quiet):
                continue
            series = [SeriesInfo(id=row.id, study_id=study.id, series_uid=row.series_uid,
                                 modality=row.modality, sop_class_uid=row.sop_class_uid,
                                 body_part=row.body_part,
                                 series_description=row.series_description, run=row.runs + 1)
                      for row in rows if row.pending]
            work.append((study.id, study.last_received_at, [(info, []) for info in series]))
            uids[study.id] = study.study_uid
    planned = []
    for study_id, last_received, items in work:
        try:
            for info, plans in items:
                plans.extend(plan(info))
        except Exception as exc:  # one unreadable study must not stop every other one
            reason = f"{type(exc).__name__}: {exc}"[:500]
            if _quarantine(factory, study_id, [info for info, _ in items], reason, now) \
                    and problems is not None:
                problems[uids[study_id]] = reason
            continue
        planned.append((study_id, last_received, items))
    created: list[int] = []
    for study_id, last_received, items in planned:
        with factory.begin() as s:
            current = s.get(Study, study_id, with_for_update=_is_postgresql(s))
            if current is None or current.last_received_at != last_received:
                continue  # an instance arrived since: not quiet any more
            if current.quarantined_at is not None:
                continue  # another node's planning of it failed meanwhile
            locked = {row.id: row for row in s.scalars(
                _locked(s, select(Series).where(Series.study_id == study_id)))}
            if any((row := locked.get(info.id)) is None or not row.pending
                   or row.runs != info.run - 1 for info, _ in items):
                continue  # another node (sharing the database) completed this run first
            current.completed_at = now
            current.runs += 1
            for info, plans in items:
                row = locked[info.id]
                row.pending = False
                row.runs = info.run
                for job_plan in plans:
                    # A new run of the same series and model supersedes the last one: the
                    # same seed gives its results the same UIDs, so they replace the earlier
                    # objects in the PACS instead of standing beside them.
                    earlier = s.scalar(select(Job.uid_seed).where(
                        Job.series_id == row.id, Job.model == job_plan.model,
                    ).order_by(Job.id.desc()).limit(1))
                    job = Job(series_id=row.id, study_id=study_id, model=job_plan.model,
                              route=job_plan.route, destinations=list(job_plan.destinations),
                              run=info.run, uid_seed=earlier or uuid.uuid4().hex,
                              status=JobStatus.QUEUED,
                              attempts=0, max_attempts=max_attempts, created_at=now)
                    s.add(job)
                    s.flush()
                    created.append(job.id)
    return created


def _quarantine(factory: SessionFactory, study_id: int, series: Sequence[SeriesInfo],
                reason: str, now: datetime) -> bool:
    """Quarantine a study whose planning failed; False when there is nothing to quarantine.

    Nothing is done when the study is gone, already quarantined, or the run that failed
    to plan was completed meanwhile (by another node sharing the database). An instance
    that arrived since does not prevent it: the failure is about what was already there.
    """
    with factory.begin() as s:
        current = s.get(Study, study_id, with_for_update=_is_postgresql(s))
        if current is None or current.quarantined_at is not None:
            return False
        locked = {row.id: row for row in s.scalars(
            _locked(s, select(Series).where(Series.study_id == study_id)))}
        if any((row := locked.get(info.id)) is None or not row.pending
               or row.runs != info.run - 1 for info in series):
            return False
        current.quarantine_reason = reason
        current.quarantined_at = now
        return True


# --- jobs -------------------------------------------------------------------


def _job_record(s: Session, job: Job) -> JobRecord:
    series = s.get(Series, job.series_id)
    study = s.get(Study, job.study_id)
    assert series is not None and study is not None
    return JobRecord(
        id=job.id, series_id=job.series_id, study_id=job.study_id, series_uid=series.series_uid,
        study_uid=study.study_uid, model=job.model, route=job.route,
        destinations=tuple(job.destinations), run=job.run,
        uid_seed=job.uid_seed, status=job.status, attempts=job.attempts,
        max_attempts=job.max_attempts, lease_owner=job.lease_owner,
    )


def get_job(factory: SessionFactory, job_id: int) -> JobRecord | None:
    with reading(factory) as s:
        job = s.get(Job, job_id)
        return None if job is None else _job_record(s, job)


def claim_job(
    factory: SessionFactory,
    owner: str,
    now: datetime,
    lease_seconds: float,
    models: Iterable[str] | None = None,
) -> JobRecord | None:
    """Atomically take the oldest due queued job (optionally only for ``models``)."""
    for _ in range(5):
        with factory.begin() as s:
            query = (
                select(Job.id)
                .where(Job.status == JobStatus.QUEUED)
                .where(or_(Job.not_before.is_(None), Job.not_before <= now))
                .order_by(Job.id)
                .limit(1)
            )
            if models is not None:
                query = query.where(Job.model.in_(list(models)))
            job_id = s.scalar(_locked(s, query, skip_locked=True))
            if job_id is None:
                return None
            claimed = _rowcount(s,
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                .values(status=JobStatus.RUNNING, lease_owner=owner,
                        lease_expires_at=now + timedelta(seconds=lease_seconds),
                        attempts=Job.attempts + 1, started_at=now, last_error=None)
            )
            if claimed == 1:
                job = s.get(Job, job_id)
                assert job is not None
                s.refresh(job)
                return _job_record(s, job)
    return None


def _fenced(job_id: int, owner: str) -> tuple[ColumnElement[bool], ...]:
    return (Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_owner == owner)


def _rowcount(s: Session, statement: Executable) -> int:
    """Execute an UPDATE and return how many rows it changed."""
    return int(cast(CursorResult[Any], s.execute(statement)).rowcount)


def heartbeat(factory: SessionFactory, job_id: int, owner: str, now: datetime,
              lease_seconds: float) -> bool:
    """Extend the lease; False when the job is no longer ours (expired and requeued)."""
    with factory.begin() as s:
        return _rowcount(s,
            update(Job).where(*_fenced(job_id, owner))
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        ) == 1


def complete_job(factory: SessionFactory, job_id: int, owner: str, now: datetime,
                 results: Sequence[ResultSpec], inference_seconds: float,
                 kinds: Mapping[str, Collection[ResultKind]] | None = None) -> bool:
    """Mark the job done and put its results in the outbox, in one transaction.

    ``kinds`` maps a destination to the result kinds it takes (all when absent). An
    object that an earlier run of the same series and model produced (same SOP
    Instance UID, see :func:`dispatch_stable_studies`) is taken over: its outbox row
    now belongs to this job and is sent again, as a replacement.
    """
    with factory.begin() as s:
        done = _rowcount(s,
            update(Job).where(*_fenced(job_id, owner))
            .values(status=JobStatus.DONE, finished_at=now, lease_owner=None,
                    lease_expires_at=None, inference_seconds=inference_seconds, last_error=None)
        ) == 1
        if not done:
            s.rollback()
            return False
        job = s.get(Job, job_id)
        assert job is not None
        for dest in job.destinations:
            for spec in results:
                if kinds is not None and dest in kinds and spec.kind not in kinds[dest]:
                    continue
                row = s.scalar(_locked(s, select(Result).where(
                    Result.destination == dest, Result.sop_instance_uid == spec.sop_instance_uid)))
                if row is None:
                    s.add(Result(job_id=job_id, destination=dest, kind=spec.kind,
                                 sop_class_uid=spec.sop_class_uid,
                                 sop_instance_uid=spec.sop_instance_uid, path=spec.path,
                                 status=ResultStatus.PENDING, attempts=0, next_attempt_at=now,
                                 created_at=now))
                    continue
                row.job_id, row.kind, row.sop_class_uid, row.path = (
                    job_id, spec.kind, spec.sop_class_uid, spec.path)
                row.status, row.attempts, row.next_attempt_at = ResultStatus.PENDING, 0, now
                row.lease_owner = row.lease_expires_at = row.sent_at = None
                row.last_error = row.warning = None
                row.warning_status = None
    return True


def fail_job(factory: SessionFactory, job_id: int, owner: str, now: datetime, error: str,
             *, retry: bool, retry_delay: float = 5.0) -> JobStatus | None:
    """Record a failure: requeue while attempts remain (and ``retry``), else FAILED."""
    with factory.begin() as s:
        job = s.get(Job, job_id, with_for_update=_is_postgresql(s))
        if job is None or job.status != JobStatus.RUNNING or job.lease_owner != owner:
            return None
        status = (JobStatus.QUEUED if retry and job.attempts < job.max_attempts
                  else JobStatus.FAILED)
        job.status = status
        job.last_error = error[:2000]
        job.lease_owner = None
        job.lease_expires_at = None
        if status is JobStatus.QUEUED:
            job.not_before = now + timedelta(seconds=retry_delay)
        else:
            job.finished_at = now
        return status


def skip_job(factory: SessionFactory, job_id: int, owner: str, now: datetime,
             reason: str) -> bool:
    """The model does not accept this input: SKIPPED with the reason, no result."""
    with factory.begin() as s:
        return _rowcount(s,
            update(Job).where(*_fenced(job_id, owner))
            .values(status=JobStatus.SKIPPED, finished_at=now, lease_owner=None,
                    lease_expires_at=None, last_error=reason[:2000])
        ) == 1


def release_job(factory: SessionFactory, job_id: int, owner: str) -> bool:
    """Give a running job back to the queue without counting the attempt (clean shutdown)."""
    with factory.begin() as s:
        return _rowcount(s,
            update(Job).where(*_fenced(job_id, owner))
            .values(status=JobStatus.QUEUED, lease_owner=None, lease_expires_at=None,
                    attempts=Job.attempts - 1)
        ) == 1


def requeue_expired(factory: SessionFactory, now: datetime) -> list[int]:
    """Requeue running jobs whose lease expired (their worker died); fail those out of attempts."""
    with factory.begin() as s:
        jobs = s.scalars(_locked(s,
            select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
            skip_locked=True)
        ).all()
        for job in jobs:
            job.last_error = f"lease of {job.lease_owner} expired (worker died or hung)"
            job.lease_owner = None
            job.lease_expires_at = None
            if job.attempts >= job.max_attempts:
                job.status = JobStatus.FAILED
                job.finished_at = now
            else:
                job.status = JobStatus.QUEUED
        return [job.id for job in jobs]


def series_instance_paths(factory: SessionFactory, series_id: int) -> list[str]:
    with reading(factory) as s:
        return list(s.scalars(
            select(Instance.path).where(Instance.series_id == series_id).order_by(Instance.id)
        ))


# --- outbox -----------------------------------------------------------------


def _result_record(r: Result) -> ResultRecord:
    return ResultRecord(id=r.id, job_id=r.job_id, destination=r.destination, kind=r.kind,
                        sop_class_uid=r.sop_class_uid, sop_instance_uid=r.sop_instance_uid,
                        path=r.path, status=r.status, attempts=r.attempts)


def due_results(factory: SessionFactory, now: datetime, limit: int = 100) -> list[ResultRecord]:
    """Pending results due at ``now`` (a read-only view; senders use :func:`claim_results`)."""
    with reading(factory) as s:
        rows = s.scalars(
            select(Result)
            .where(and_(Result.status == ResultStatus.PENDING, Result.next_attempt_at <= now))
            .order_by(Result.id).limit(limit)
        ).all()
        return [_result_record(r) for r in rows]


def _claimable(now: datetime) -> ColumnElement[bool]:
    """Due pending results, and results whose sender's lease expired (it died mid-send)."""
    return or_(
        and_(Result.status == ResultStatus.PENDING, Result.next_attempt_at <= now),
        and_(Result.status == ResultStatus.SENDING, Result.lease_expires_at < now),
    )


def claim_results(factory: SessionFactory, owner: str, now: datetime, lease_seconds: float,
                  limit: int = 16, exclude: Collection[str] = ()) -> list[ResultRecord]:
    """Atomically take up to ``limit`` due results for ``owner`` to send (status SENDING).

    Two senders (threads, or nodes sharing PostgreSQL) never claim the same row. A
    sender that dies leaves its rows SENDING until the lease expires; then another
    claims and resends them, with the same SOP Instance UIDs. Results for the
    destinations in ``exclude`` (an open circuit breaker) are left untouched.
    """
    with factory.begin() as s:
        query = select(Result.id).where(_claimable(now))
        if exclude:
            query = query.where(Result.destination.not_in(list(exclude)))
        ids = list(s.scalars(_locked(s, query.order_by(Result.id).limit(limit),
                                     skip_locked=True)))
        if not ids:
            return []
        claimed = list(s.scalars(
            update(Result).where(Result.id.in_(ids), _claimable(now))
            .values(status=ResultStatus.SENDING, lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds))
            .returning(Result.id)
            .execution_options(synchronize_session=False)
        ))
        rows = s.scalars(select(Result).where(Result.id.in_(claimed)).order_by(Result.id)).all()
        return [_result_record(r) for r in rows]


def mark_sent(factory: SessionFactory, result_id: int, now: datetime,
              owner: str | None = None, *, warning: StoreWarning | None = None) -> bool:
    """Record the destination's acknowledgement; False when it was already recorded.

    With ``warning`` the destination stored the object with a warning status: it is
    delivered all the same (SENT, never resent), and the warning is kept on the row.
    Not fenced by ``owner``: an acknowledged object is delivered, even if this
    sender's lease ran out meanwhile (the other sender's resend is then a harmless
    overwrite of the same SOP Instance UID).
    """
    del owner  # accepted for symmetry with mark_send_failed
    with factory.begin() as s:
        return _rowcount(s,
            update(Result).where(Result.id == result_id, Result.status != ResultStatus.SENT)
            .values(status=ResultStatus.SENT, sent_at=now, attempts=Result.attempts + 1,
                    last_error=None, lease_owner=None, lease_expires_at=None,
                    warning_status=None if warning is None else warning.status,
                    warning=None if warning is None else warning.text[:2000])
        ) == 1


def mark_send_failed(factory: SessionFactory, result_id: int, now: datetime, error: str, *,
                     retry_at: datetime | None, max_attempts: int,
                     owner: str | None = None) -> ResultStatus:
    """Count a failed attempt: PENDING again at ``retry_at``, or FAILED (no retry or exhausted).

    With ``owner`` the update is fenced by the claim: a sender whose lease expired
    (and whose rows another sender took over) changes nothing and gets the row's
    current status back.
    """
    with factory.begin() as s:
        result = s.get(Result, result_id, with_for_update=_is_postgresql(s))
        assert result is not None
        if owner is not None and (result.status is not ResultStatus.SENDING
                                  or result.lease_owner != owner):
            return result.status
        if result.status is ResultStatus.SENT:
            return result.status
        result.attempts += 1
        result.last_error = error[:2000]
        result.lease_owner = None
        result.lease_expires_at = None
        if retry_at is None or result.attempts >= max_attempts:
            result.status = ResultStatus.FAILED
        else:
            result.status = ResultStatus.PENDING
            result.next_attempt_at = retry_at
        return result.status


def release_results(factory: SessionFactory, result_ids: Collection[int], owner: str,
                    now: datetime) -> int:
    """Give claimed results back unattempted (PENDING, due ``now``, attempts unchanged).

    For the objects of a batch that were never offered to the destination because the
    association was lost before their turn. Fenced by the claim; returns how many.
    """
    if not result_ids:
        return 0
    with factory.begin() as s:
        return _rowcount(s, update(Result).where(
            Result.id.in_(list(result_ids)), Result.status == ResultStatus.SENDING,
            Result.lease_owner == owner,
        ).values(status=ResultStatus.PENDING, lease_owner=None, lease_expires_at=None,
                 next_attempt_at=now).execution_options(synchronize_session=False))


def count_jobs(factory: SessionFactory) -> dict[str, int]:
    with reading(factory) as s:
        rows = s.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        return {status.value: n for status, n in rows}


def first_instance_path(factory: SessionFactory, series_id: int) -> str | None:
    with reading(factory) as s:
        return s.scalar(
            select(Instance.path).where(Instance.series_id == series_id)
            .order_by(Instance.id).limit(1)
        )
