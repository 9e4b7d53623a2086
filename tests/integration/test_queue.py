"""The queue on a real SQLite file: ingest, study completion, claims, leases, outbox."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import select

from db.queue import (
    JobPlan,
    ResultSpec,
    SeriesInfo,
    claim_job,
    complete_job,
    dispatch_stable_studies,
    due_results,
    fail_job,
    heartbeat,
    mark_send_failed,
    mark_sent,
    record_instance,
    record_instances,
    requeue_expired,
    skip_job,
)
from db.schema import Job, JobStatus, Result, ResultStatus, Series, Study
from tests.conftest import T0, Factory, assert_schema_matches, dispatch, meta, one_model


def test_migrations_match_declared_schema(db_url: str) -> None:
    assert_schema_matches(db_url)


def test_sqlite_runs_in_wal_mode_with_full_sync(factory: Factory) -> None:
    with factory() as s:
        assert s.connection().exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert s.connection().exec_driver_sql("PRAGMA synchronous").scalar() == 2


def test_duplicate_instance_is_recorded_once(factory: Factory) -> None:
    assert record_instance(factory, meta("1.9.1"), T0)
    assert not record_instance(factory, meta("1.9.1"), T0)
    with factory() as s:
        series = s.scalars(select(Series)).one()
        assert series.instance_count == 1


def test_a_batch_records_new_studies_series_and_duplicates_in_one_go(factory: Factory) -> None:
    assert record_instance(factory, meta("1.9.1"), T0)
    batch = [meta("1.9.1"),                                   # already recorded
             meta("1.9.2"), meta("1.9.3"), meta("1.9.2"),      # new, and a repeat in the batch
             meta("1.9.4", series="1.2.3.2"),                 # a new series of the same study
             meta("1.9.5", series="1.2.4.1", study="1.2.4")]  # a new study
    later = T0 + timedelta(seconds=5)
    assert record_instances(factory, batch, later) == [False, True, True, False, True, True]
    with factory() as s:
        counts = {se.series_uid: se.instance_count for se in s.scalars(select(Series))}
        assert counts == {"1.2.3.1": 3, "1.2.3.2": 1, "1.2.4.1": 1}
        assert all(se.pending and se.last_received_at == later
                   for se in s.scalars(select(Series)))
        studies = {st.study_uid: st for st in s.scalars(select(Study))}
        assert set(studies) == {"1.2.3", "1.2.4"}
        assert studies["1.2.3"].first_received_at == T0
        assert studies["1.2.3"].last_received_at == later


def test_study_completes_only_after_quiet_period(factory: Factory) -> None:
    record_instance(factory, meta("1.9.1"), T0)
    record_instance(factory, meta("1.9.2"), T0 + timedelta(seconds=30))
    assert dispatch(factory, T0 + timedelta(seconds=60)) == []
    jobs = dispatch(factory, T0 + timedelta(seconds=91))
    assert len(jobs) == 1
    assert dispatch(factory, T0 + timedelta(seconds=200)) == []  # nothing new: no second run
    with factory() as s:
        study = s.scalars(select(Study)).one()
        assert study.completed_at == T0 + timedelta(seconds=91)
        job = s.get(Job, jobs[0])
        assert job is not None and job.status is JobStatus.QUEUED and job.run == 1


def test_late_instance_starts_a_new_run(factory: Factory) -> None:
    record_instance(factory, meta("1.9.1"), T0)
    first = dispatch(factory, T0 + timedelta(seconds=61))
    record_instance(factory, meta("1.9.2"), T0 + timedelta(seconds=300))
    second = dispatch(factory, T0 + timedelta(seconds=361))
    assert len(first) == len(second) == 1 and first != second
    with factory() as s:
        runs = [j.run for j in s.scalars(select(Job).order_by(Job.id))]
        seeds = {j.uid_seed for j in s.scalars(select(Job))}
    assert runs == [1, 2]
    assert len(seeds) == 1  # the new run supersedes the first: same result UIDs


def test_a_new_run_replaces_the_earlier_results_in_the_outbox(factory: Factory) -> None:
    """The second run's objects have the first run's UIDs: their outbox rows are taken
    over and sent again (replacing the objects in the PACS), never added beside them."""
    record_instance(factory, meta("1.9.1"), T0)
    (first,) = dispatch(factory, T0 + timedelta(seconds=61))
    spec = ResultSpec("SR", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.9.1", "results/job-1/sr.dcm")
    assert claim_job(factory, "w", T0 + timedelta(seconds=62), 60) is not None
    assert complete_job(factory, first, "w", T0 + timedelta(seconds=63), [spec], 1.0)
    with factory() as s:
        sent = s.scalars(select(Result)).one()
    assert mark_sent(factory, sent.id, T0 + timedelta(seconds=64))
    record_instance(factory, meta("1.9.2"), T0 + timedelta(seconds=300))  # a late instance
    (second,) = dispatch(factory, T0 + timedelta(seconds=361))
    assert claim_job(factory, "w", T0 + timedelta(seconds=362), 60) is not None
    again = ResultSpec("SR", spec.sop_class_uid, spec.sop_instance_uid, "results/job-2/sr.dcm")
    assert complete_job(factory, second, "w", T0 + timedelta(seconds=363), [again], 1.0)
    with factory() as s:
        row = s.scalars(select(Result)).one()  # one object in the outbox, not two
    assert (row.job_id, row.path, row.status, row.attempts, row.sent_at) == (
        second, "results/job-2/sr.dcm", ResultStatus.PENDING, 0, None)


def test_claim_is_atomic_across_threads(factory: Factory) -> None:
    for i in range(5):
        record_instance(factory, meta(f"1.9.{i}", series=f"1.2.3.{i}"), T0)
    assert len(dispatch(factory, T0 + timedelta(seconds=61))) == 5
    claimed: list[int] = []
    lock = threading.Lock()

    def grab(owner: str) -> None:
        while (job := claim_job(factory, owner, T0, 60)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=grab, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 5


def test_expired_lease_is_requeued_and_stale_owner_is_fenced(factory: Factory) -> None:
    record_instance(factory, meta("1.9.1"), T0)
    dispatch(factory, T0 + timedelta(seconds=61))
    job = claim_job(factory, "dead-worker", T0, lease_seconds=10)
    assert job is not None and job.attempts == 1
    assert heartbeat(factory, job.id, "dead-worker", T0 + timedelta(seconds=5), 10)
    assert requeue_expired(factory, T0 + timedelta(seconds=14)) == []
    assert requeue_expired(factory, T0 + timedelta(seconds=16)) == [job.id]
    again = claim_job(factory, "new-worker", T0 + timedelta(seconds=17), 10)
    assert again is not None and again.id == job.id and again.attempts == 2
    spec = ResultSpec("SR", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.9", "results/x.dcm")
    # The dead worker's late completion must not count.
    assert not complete_job(factory, job.id, "dead-worker", T0, [spec], 1.0)
    assert complete_job(factory, job.id, "new-worker", T0, [spec], 1.0)
    assert [r.destination for r in due_results(factory, T0)] == ["pacs"]


def test_attempts_are_bounded(factory: Factory) -> None:
    record_instance(factory, meta("1.9.1"), T0)
    dispatch(factory, T0 + timedelta(seconds=61))
    job = claim_job(factory, "w", T0, 10)
    assert job is not None
    assert fail_job(factory, job.id, "w", T0, "boom", retry=True, retry_delay=5) \
        is JobStatus.QUEUED
    assert claim_job(factory, "w", T0 + timedelta(seconds=1), 10) is None  # not before 5 s
    job = claim_job(factory, "w", T0 + timedelta(seconds=6), 10)
    assert job is not None and job.attempts == 2
    assert fail_job(factory, job.id, "w", T0, "boom", retry=True) is JobStatus.FAILED


def test_skip_records_reason(factory: Factory) -> None:
    record_instance(factory, meta("1.9.1"), T0)
    dispatch(factory, T0 + timedelta(seconds=61))
    job = claim_job(factory, "w", T0, 10)
    assert job is not None
    assert skip_job(factory, job.id, "w", T0, "needs at least 10 slices")
    with factory() as s:
        row = s.get(Job, job.id)
        assert row is not None and row.status is JobStatus.SKIPPED
        assert row.last_error == "needs at least 10 slices"


def test_outbox_backoff_and_success(factory: Factory) -> None:
    record_instance(factory, meta("1.9.1"), T0)
    dispatch(factory, T0 + timedelta(seconds=61))
    job = claim_job(factory, "w", T0, 10)
    assert job is not None
    complete_job(factory, job.id, "w", T0, [
        ResultSpec("SEG", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.8", "results/a.dcm"),
        ResultSpec("SR", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.9", "results/b.dcm"),
    ], 1.0)
    seg, sr = due_results(factory, T0)
    status = mark_send_failed(factory, seg.id, T0, "refused", retry_at=T0 + timedelta(seconds=30),
                              max_attempts=3)
    assert status is ResultStatus.PENDING
    assert [r.id for r in due_results(factory, T0 + timedelta(seconds=1))] == [sr.id]
    mark_sent(factory, sr.id, T0)
    assert [r.id for r in due_results(factory, T0 + timedelta(seconds=31))] == [seg.id]
    assert mark_send_failed(factory, seg.id, T0, "no such SOP class", retry_at=None,
                            max_attempts=3) is ResultStatus.FAILED
    assert due_results(factory, T0 + timedelta(days=1)) == []


def test_a_held_study_waits_and_an_unroutable_one_does_not_stop_the_others(
        factory: Factory) -> None:
    """Held: instances received but not yet recorded. Unroutable: its planning raises
    (an unreadable file); it is quarantined with its reason, the other study completes."""
    record_instance(factory, meta("1.9.1", series="1.2.3.1", study="1.2.3"), T0)
    record_instance(factory, meta("1.9.2", series="1.2.4.1", study="1.2.4"), T0)
    record_instance(factory, meta("1.9.3", series="1.2.5.1", study="1.2.5"), T0)

    def plan(series: SeriesInfo) -> list[JobPlan]:
        if series.series_uid == "1.2.4.1":
            raise OSError("unreadable instance file")
        return one_model(series)

    problems: dict[str, str] = {}
    later = T0 + timedelta(seconds=120)
    jobs = dispatch_stable_studies(factory, later, lambda _m: 60.0, plan, max_attempts=2,
                                   held={"1.2.5"}, problems=problems)
    assert len(jobs) == 1
    assert problems == {"1.2.4": "OSError: unreadable instance file"}
    with factory() as s:
        done = {st.study_uid for st in s.scalars(select(Study)) if st.completed_at}
    assert done == {"1.2.3"}
    # Held no more: it completes. Quarantined: left alone until an admin retries it
    # (tests/integration/test_quarantine.py).
    assert len(dispatch(factory, later)) == 1
