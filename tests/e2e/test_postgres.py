"""The queue on a real PostgreSQL 15 server: the SQLite state-machine tests, concurrent
claims from several processes, and two ``ainode serve`` nodes sharing one database.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select, text

import tests.integration.test_queue as sqlite_cases
from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.queue import (
    ResultSpec,
    claim_job,
    claim_results,
    complete_job,
    due_results,
    mark_send_failed,
    mark_sent,
    record_instance,
)
from db.schema import Instance, Job, JobStatus, Result, ResultStatus, Series
from tests.conftest import T0, Factory, assert_schema_matches, dispatch, meta
from tests.integration.test_migrations import check_destinations_become_json_lists
from tests.peers import (
    CHEST_CT,
    NodeProcess,
    dcmtk_env,
    free_port,
    port_open,
    start_node,
    stop_process,
    storescu,
    wait_until,
    write_config,
)
from tests.pg import (  # noqa: F401
    PostgresServer,
    pg_factory_fixture,
    pg_url_fixture,
    postgres_fixture,
)

# Every queue state-machine test of tests/integration/test_queue.py that takes the session factory.
QUEUE_CASES: list[Callable[[Factory], None]] = [
    sqlite_cases.test_duplicate_instance_is_recorded_once,
    sqlite_cases.test_study_completes_only_after_quiet_period,
    sqlite_cases.test_late_instance_starts_a_new_run,
    sqlite_cases.test_claim_is_atomic_across_threads,
    sqlite_cases.test_expired_lease_is_requeued_and_stale_owner_is_fenced,
    sqlite_cases.test_attempts_are_bounded,
    sqlite_cases.test_skip_records_reason,
    sqlite_cases.test_outbox_backoff_and_success,
]


def test_runs_on_postgresql_15(pg_factory: Factory) -> None:
    with pg_factory() as s:
        version = str(s.execute(text("SHOW server_version")).scalar())
        assert s.bind is not None and s.bind.dialect.name == "postgresql"
    assert version.startswith("15.")


def test_migrations_match_declared_schema(pg_url: str) -> None:
    assert_schema_matches(pg_url)


def test_migrating_twice_and_concurrently_is_harmless(pg_url: str) -> None:
    threads = [threading.Thread(target=upgrade, args=(pg_url,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_schema_matches(pg_url)


def test_comma_joined_destinations_become_json_lists(postgres: PostgresServer) -> None:
    check_destinations_become_json_lists(postgres.create_database())


@pytest.mark.parametrize("case", QUEUE_CASES, ids=lambda c: c.__name__.removeprefix("test_"))
def test_queue_state_machine(case: Callable[[Factory], None], pg_factory: Factory) -> None:
    case(pg_factory)


# --- concurrency: several processes on one database ------------------------------

JOBS = 200


def _claim_all(url: str, owner: str, threads: int, start: Any) -> list[int]:
    """In a child process: claim jobs from ``threads`` threads until none is left."""
    engine = make_engine(url)
    factory = make_session_factory(engine)
    start.wait()  # every process is up and connected before anyone claims
    claimed: list[int] = []
    lock = threading.Lock()

    def grab(name: str) -> None:
        while (job := claim_job(factory, name, T0, 600)) is not None:
            with lock:
                claimed.append(job.id)

    pool = [threading.Thread(target=grab, args=(f"{owner}-t{i}",)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    engine.dispose()
    return claimed


def _claim_results_all(url: str, owner: str, start: Any) -> list[int]:
    engine = make_engine(url)
    factory = make_session_factory(engine)
    start.wait()
    sent: list[int] = []
    while batch := claim_results(factory, owner, T0, 600, limit=3):
        for result in batch:
            assert mark_sent(factory, result.id, T0, owner)
            sent.append(result.id)
    engine.dispose()
    return sent


def _spawn(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def test_concurrent_claims_from_processes_never_overlap(pg_url: str, pg_factory: Factory) -> None:
    for i in range(JOBS):
        record_instance(pg_factory, meta(f"1.9.{i}", series=f"1.2.3.{i}"), T0)
    assert len(dispatch(pg_factory, T0 + timedelta(seconds=61))) == JOBS
    with multiprocessing.get_context("spawn").Manager() as manager, _spawn(4) as pool:
        start = manager.Barrier(4)
        parts = list(pool.map(_claim_all, [pg_url] * 4, [f"p{i}" for i in range(4)], [3] * 4,
                              [start] * 4))
    claimed = [job for part in parts for job in part]
    assert len(claimed) == len(set(claimed)) == JOBS
    assert sum(1 for part in parts if part) >= 2  # the processes really competed
    with pg_factory() as s:
        owners = s.scalars(select(Job.lease_owner)).all()
        assert len(owners) == JOBS and all(owners)
        assert set(s.scalars(select(Job.attempts))) == {1}


def test_concurrent_outbox_claims_send_each_result_once(pg_url: str,
                                                        pg_factory: Factory) -> None:
    for i in range(20):
        record_instance(pg_factory, meta(f"1.9.{i}", series=f"1.2.3.{i}"), T0)
    dispatch(pg_factory, T0 + timedelta(seconds=61))
    while (job := claim_job(pg_factory, "w", T0, 60)) is not None:
        specs = [ResultSpec(kind, "1.2.840.10008.5.1.4.1.1.88.34", f"1.2.9.{job.id}.{n}",
                            f"results/{job.id}-{n}.dcm") for n, kind in enumerate(("SEG", "SR"))]
        assert complete_job(pg_factory, job.id, "w", T0, specs, 0.1)
    with multiprocessing.get_context("spawn").Manager() as manager, _spawn(4) as pool:
        start = manager.Barrier(4)
        parts = list(pool.map(_claim_results_all, [pg_url] * 4, [f"s{i}" for i in range(4)],
                              [start] * 4))
    sent = [r for part in parts for r in part]
    assert len(sent) == len(set(sent)) == 40
    with pg_factory() as s:
        rows = s.scalars(select(Result)).all()
        assert {r.status for r in rows} == {ResultStatus.SENT}
        assert {r.attempts for r in rows} == {1}


def test_concurrent_ingest_of_one_series_counts_every_instance(pg_factory: Factory) -> None:
    """Many receivers filing instances of the same new study at once: no lost update, no error."""
    errors: list[BaseException] = []

    def receive(start: int) -> None:
        try:
            for i in range(start, start + 25):
                record_instance(pg_factory, meta(f"1.9.{i}"), T0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=receive, args=(n * 25,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with pg_factory() as s:
        series = s.scalars(select(Series)).one()
        assert series.instance_count == 200
        assert s.scalar(select(func.count()).select_from(Instance)) == 200


def test_two_dispatchers_complete_a_study_once(pg_factory: Factory) -> None:
    for i in range(5):
        record_instance(pg_factory, meta(f"1.9.{i}", series=f"1.2.3.{i}"), T0)
    created: list[list[int]] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        created.append(dispatch(pg_factory, T0 + timedelta(seconds=61)))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobs = [j for part in created for j in part]
    assert len(jobs) == len(set(jobs)) == 5
    with pg_factory() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 5


def test_stale_sender_cannot_undo_another_senders_outcome(pg_factory: Factory) -> None:
    record_instance(pg_factory, meta("1.9.1"), T0)
    dispatch(pg_factory, T0 + timedelta(seconds=61))
    job = claim_job(pg_factory, "w", T0, 60)
    assert job is not None
    spec = ResultSpec("SR", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.9", "results/x.dcm")
    assert complete_job(pg_factory, job.id, "w", T0, [spec], 0.1)
    (first,) = claim_results(pg_factory, "dead-sender", T0, 30)
    assert claim_results(pg_factory, "other", T0 + timedelta(seconds=10), 30) == []
    assert due_results(pg_factory, T0 + timedelta(seconds=10)) == []
    # The first sender's lease runs out: another takes the row over and delivers it.
    (again,) = claim_results(pg_factory, "other", T0 + timedelta(seconds=31), 30)
    assert again.id == first.id
    assert mark_sent(pg_factory, again.id, T0 + timedelta(seconds=32), "other")
    late = mark_send_failed(pg_factory, first.id, T0 + timedelta(seconds=33), "timeout",
                            retry_at=T0 + timedelta(seconds=40), max_attempts=5,
                            owner="dead-sender")
    assert late is ResultStatus.SENT
    with pg_factory() as s:
        row = s.get(Result, first.id)
        assert row is not None and row.status is ResultStatus.SENT and row.attempts == 1




# --- two nodes, one database ------------------------------------------------------


def copy_as_new_study(files: list[Path], out: Path) -> list[Path]:
    """The same images under new study, series and instance UIDs: a second patient visit."""
    out.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    copies = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.AccessionNumber = "ACC2"
        copies.append(out / path.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def start_storescp(out: Path, port: int) -> subprocess.Popen[bytes]:
    """dcmtk storescp as the PACS; ``+uf`` gives every received object its own file,
    so a result sent twice shows up as two files."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", "PACS", "+xa", "+uf", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env())
    wait_until(lambda: port_open(port), 10, what="storescp")
    return proc


@pytest.mark.e2e
def test_two_nodes_share_one_database_and_do_everything_once(
        tmp_path: Path, pg_url: str, pg_factory: Factory) -> None:
    ct = sorted(CHEST_CT.glob("*.dcm"))
    second = copy_as_new_study(ct, tmp_path / "second")
    pacs_port = free_port()
    received = tmp_path / "pacs"
    started: list[Any] = [start_storescp(received, pacs_port)]
    nodes: list[NodeProcess] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            config = write_config(
                tmp_path / f"node-{name}.toml", port=port, storage=tmp_path / "var", db_url=pg_url,
                destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                               "port": pacs_port}],
                routes=[{"name": "chest-ct", "match": {"Modality": "CT"}, "models": ["ct-lung"],
                         "destinations": ["pacs"]}])
            nodes.append(start_node(config, port, tmp_path / f"node-{name}.log"))
            started.append(nodes[-1])
        # The first study arrives split over both nodes, the second on node b, all at once.
        pushes = [(nodes[0].port, ct[0::2]), (nodes[1].port, ct[1::2]), (nodes[1].port, second)]
        with ThreadPoolExecutor(len(pushes)) as pool:
            outs = list(pool.map(lambda p: storescu(p[0], list(p[1])), pushes))
        for out in outs:
            assert out.returncode == 0, out.stderr
            assert "Store Response (Success)" in out.stderr

        def all_sent() -> bool:
            with pg_factory() as s:
                rows = s.scalars(select(Result)).all()
                return len(rows) == 4 and all(r.status is ResultStatus.SENT for r in rows)

        wait_until(all_sent, 300, interval=0.5, what="4 results sent")
        time.sleep(3)  # a double send would arrive now: give it the chance
        files = [p for p in received.iterdir() if p.is_file()]
        uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
        assert len(files) == 4 and len(set(uids)) == 4, sorted(p.name for p in files)
        with pg_factory() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 2 * len(ct)
            jobs = s.scalars(select(Job).order_by(Job.id)).all()
            assert [(j.status, j.attempts) for j in jobs] == [(JobStatus.DONE, 1)] * 2
            rows = s.scalars(select(Result)).all()
            assert sorted(r.sop_instance_uid for r in rows) == sorted(uids)
            assert {r.attempts for r in rows} == {1}
        logs = "".join(node.log() for node in nodes)
        for job in jobs:
            assert logs.count(f"job {job.id}: ct-lung on series") == 1, logs
        for row in rows:
            assert logs.count(f"result {row.id} ({row.kind} sop=") == 1, logs
        assert "Traceback" not in logs, logs
    finally:
        for proc in reversed(started):
            if isinstance(proc, NodeProcess):
                proc.stop()
            else:
                stop_process(proc)
