"""The per-destination circuit breaker: its state machine, and the sender with a real peer."""

from __future__ import annotations

import logging
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from db.queue import (
    InstanceMeta,
    JobPlan,
    ResultSpec,
    SeriesInfo,
    claim_job,
    complete_job,
    dispatch_stable_studies,
    record_instance,
)
from db.schema import Result, ResultStatus
from node.runtime.scheduler import make_scheduler
from node.send.breaker import CircuitBreaker, State
from node.send.sender import send_due
from node.settings import Settings, parse_settings
from tests.conftest import T0, Factory
from tests.peers import SAMPLES, dcmtk_env, free_port, port_open, stop_process, wait_until

SR_FILE = SAMPLES / "reference-seg-sr" / "sr_document_TID1500_highdicom.dcm"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class WallClock:
    """The sender's (database) clock, moved by the test."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


# --- the state machine ----------------------------------------------------------------


def test_opens_after_threshold_consecutive_failures(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, open_seconds=30, clock=clock)
    caplog.set_level(logging.INFO, "ainode.breaker")
    for _ in range(2):
        assert breaker.allow("pacs")
        breaker.record_failure("pacs", "refused")
    assert breaker.state("pacs") is State.CLOSED and caplog.records == []
    breaker.record_failure("pacs", "refused")
    assert breaker.state("pacs") is State.OPEN
    assert not breaker.allow("pacs") and breaker.blocked("pacs")
    assert breaker.allow("other") and not breaker.blocked("other")  # per destination
    (line,) = [r.getMessage() for r in caplog.records]
    assert "pacs" in line and "open" in line and "refused" in line


def test_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(failure_threshold=3, open_seconds=30, clock=FakeClock())
    for _ in range(2):
        breaker.record_failure("pacs", "refused")
    breaker.record_success("pacs")
    for _ in range(2):
        breaker.record_failure("pacs", "refused")
    assert breaker.state("pacs") is State.CLOSED and breaker.allow("pacs")


def test_half_open_trial_success_closes(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, open_seconds=30, clock=clock)
    caplog.set_level(logging.INFO, "ainode.breaker")
    breaker.record_failure("pacs", "refused")
    clock.now += 29.9
    assert not breaker.allow("pacs")
    clock.now += 0.2
    assert not breaker.blocked("pacs")
    assert breaker.allow("pacs")  # the one trial
    assert breaker.state("pacs") is State.HALF_OPEN
    assert not breaker.allow("pacs") and breaker.blocked("pacs")  # only one at a time
    breaker.record_success("pacs")
    assert breaker.state("pacs") is State.CLOSED and breaker.allow("pacs")
    states = [r.getMessage().split("circuit ")[1].split(":")[0] for r in caplog.records]
    assert states == ["open", "half-open", "closed"]


def test_half_open_trial_failure_reopens_longer_up_to_the_cap() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, open_seconds=10, max_open_seconds=25,
                             clock=clock)
    breaker.record_failure("pacs", "refused")
    breaker.record_failure("pacs", "refused")
    for cool_down in (10, 20, 25, 25):
        clock.now += cool_down - 0.1
        assert not breaker.allow("pacs")
        clock.now += 0.1
        assert breaker.allow("pacs")
        breaker.record_failure("pacs", "still refused")  # one failed trial re-opens
        assert breaker.state("pacs") is State.OPEN
    clock.now += 25
    assert breaker.allow("pacs")
    breaker.record_success("pacs")
    breaker.record_failure("pacs", "refused")  # closed again: the count starts over
    assert breaker.state("pacs") is State.CLOSED
    breaker.record_failure("pacs", "refused")
    clock.now += 10  # and the cool-down is back to its base
    assert breaker.allow("pacs")


def test_unused_trial_is_given_back() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, open_seconds=5, clock=clock)
    breaker.record_failure("pacs", "refused")
    clock.now += 5
    assert breaker.allow("pacs")
    breaker.release("pacs")
    assert breaker.state("pacs") is State.HALF_OPEN
    assert breaker.allow("pacs")


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(open_seconds=0)


def test_scheduler_passes_one_breaker_from_settings(tmp_path: Path) -> None:
    settings = parse_settings(f'[storage]\ndir = "{tmp_path}"\n'
                              "[send]\nbreaker_failures = 5\nbreaker_open_seconds = 7\n")
    scheduler = make_scheduler(settings, sessionmaker(), lambda: T0)
    job = scheduler.get_job("send-results")
    assert job is not None
    breaker = job.kwargs["breaker"]
    assert isinstance(breaker, CircuitBreaker)
    assert breaker.failure_threshold == 5 and breaker.open_seconds == 7


# --- the sender against a real port: closed, then dcmtk storescp ------------------------


def outbox(factory: Factory, storage: Path, count: int) -> list[str]:
    """``count`` queued SR results for destination ``pacs``; return their SOP Instance UIDs."""
    (storage / "results").mkdir(parents=True)
    record_instance(factory, InstanceMeta(
        study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.9.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
        path="instances/1.9.1.dcm", size=10, calling_ae="TEST", modality="CT"), T0)

    def plan(series: SeriesInfo) -> list[JobPlan]:
        return [JobPlan(series_id=series.id, model="m", route="r", destinations=("pacs",))]

    assert len(dispatch_stable_studies(factory, T0 + timedelta(seconds=61), lambda _m: 60.0,
                                       plan, max_attempts=2)) == 1
    job = claim_job(factory, "w", T0, 60)
    assert job is not None
    specs, uids = [], []
    for n in range(count):
        ds = pydicom.dcmread(SR_FILE)
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.7{n}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(storage / "results" / f"sr{n}.dcm")
        specs.append(ResultSpec("SR", str(ds.SOPClassUID), ds.SOPInstanceUID,
                                f"results/sr{n}.dcm"))
        uids.append(ds.SOPInstanceUID)
    assert complete_job(factory, job.id, "w", T0, specs, 0.1)
    return uids


def rows(factory: Factory) -> list[tuple[ResultStatus, int, str | None]]:
    with factory() as s:
        return [(r.status, r.attempts, r.lease_owner)
                for r in s.scalars(select(Result).order_by(Result.id))]


def settings_for(storage: Path, port: int) -> Settings:
    return parse_settings(f"""
[dicom]
ae_title = "AINODE"
[storage]
dir = "{storage}"
[send]
timeout_seconds = 5
max_attempts = 50
breaker_failures = 3
breaker_open_seconds = 30
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {port}
""")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_open_circuit_stops_attempts_then_backlog_drains_once(tmp_path: Path,
                                                              factory: Factory) -> None:
    storage, received = tmp_path / "var", tmp_path / "pacs"
    received.mkdir()
    uids = outbox(factory, storage, 3)
    port = free_port()  # nothing listens here: the PACS is down
    settings = settings_for(storage, port)
    mono = FakeClock()
    breaker = CircuitBreaker(settings.send.breaker_failures, settings.send.breaker_open_seconds,
                             max_open_seconds=settings.send.backoff_max_seconds, clock=mono)
    wall = WallClock()
    for round_ in range(1, 4):  # each round's results are due again (far past any backoff)
        wall.now += timedelta(hours=1)
        assert send_due(settings, factory, wall, breaker=breaker) == 0
        assert rows(factory) == [(ResultStatus.PENDING, round_, None)] * 3
    assert breaker.state("pacs") is State.OPEN
    for _ in range(3):  # open: no association, results not claimed, no attempt counted
        wall.now += timedelta(hours=1)
        mono.now += 9
        assert send_due(settings, factory, wall, breaker=breaker) == 0
        assert rows(factory) == [(ResultStatus.PENDING, 3, None)] * 3
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "+uf", "-od", str(received), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dcmtk_env())
    try:
        wait_until(lambda: port_open(port), 10, what="storescp")
        # Up, but the cool-down (30 s, 27 of it spent) has not passed: still nothing sent.
        assert send_due(settings, factory, wall, breaker=breaker) == 0
        assert not list(received.iterdir())
        mono.now += 3
        assert send_due(settings, factory, wall, breaker=breaker) == 3  # the trial
        assert breaker.state("pacs") is State.CLOSED
        assert rows(factory) == [(ResultStatus.SENT, 4, None)] * 3
        wall.now += timedelta(hours=1)
        assert send_due(settings, factory, wall, breaker=breaker) == 0
    finally:
        stop_process(pacs)
    files = list(received.iterdir())
    assert len(files) == 3
    assert sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files) == sorted(uids)


def test_without_breaker_every_round_attempts(tmp_path: Path, factory: Factory) -> None:
    """Existing callers (no breaker) keep the old behaviour."""
    storage = tmp_path / "var"
    outbox(factory, storage, 1)
    settings = settings_for(storage, free_port())
    wall = WallClock()
    for round_ in range(1, 6):
        wall.now += timedelta(hours=1)
        assert send_due(settings, factory, wall) == 0
        assert rows(factory) == [(ResultStatus.PENDING, round_, None)]
