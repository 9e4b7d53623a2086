"""A worker that stops reporting (SIGSTOP, or hung outside a job) is killed and replaced.

First the rule on real processes and a real queue (presence rows, job leases);
then ``ainode serve`` with one worker, whose worker is SIGSTOPped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from db.admin import report_presence, workers
from db.queue import claim_job, record_instance
from node.runtime.clock import utcnow
from node.runtime.supervisor import Process, Supervisor, silence_limit, silent_workers
from node.settings import WorkerSettings
from tests.conftest import T0, Factory, dispatch, meta
from tests.peers import free_port, start_node, wait_until, write_config

HOST = socket.gethostname()
LIMIT = 20.0


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def sleeper(procs: list[subprocess.Popen[bytes]]) -> Process:
    """A child process that never reports (``sleep``), started at T0."""
    proc = subprocess.Popen(["sleep", "600"])
    procs.append(proc)
    return Process(proc, started_at=T0)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_silent_means_no_presence_and_no_live_lease_for_the_limit(
        factory: Factory, sleepers: list[subprocess.Popen[bytes]]) -> None:
    idle, busy, new = sleeper(sleepers), sleeper(sleepers), sleeper(sleepers)
    clock = Clock()
    silent = silent_workers(factory, clock, LIMIT, startup=60)
    for child in (idle, busy):
        report_presence(factory, f"{HOST}:{child.proc.pid}", child.proc.pid, "cpu", T0)
    record_instance(factory, meta("1.2.3.4"), T0)
    dispatch(factory, T0 + timedelta(seconds=61))
    assert claim_job(factory, f"{HOST}:{busy.proc.pid}", T0 + timedelta(seconds=5), 50)

    clock.now = T0 + timedelta(seconds=LIMIT - 1)
    assert silent([idle, busy, new]) == set()
    clock.now = T0 + timedelta(seconds=LIMIT + 1)
    assert silent([idle, busy, new]) == {idle.proc.pid}  # busy: its job's lease is alive
    clock.now = T0 + timedelta(seconds=56)  # the lease (until T0+55 s) has expired
    assert silent([idle, busy, new]) == {idle.proc.pid, busy.proc.pid}
    clock.now = T0 + timedelta(seconds=61)  # never reported, past its start-up allowance
    assert silent([idle, busy, new]) == {idle.proc.pid, busy.proc.pid, new.proc.pid}


def test_silent_child_is_killed_and_replaced_after_two_checks(
        sleepers: list[subprocess.Popen[bytes]]) -> None:
    quiet: set[int] = set()
    supervisor = Supervisor("worker", 2, lambda _i: sleeper(sleepers),
                            silent=lambda children: quiet & {c.proc.pid for c in children})
    first, second = supervisor.start()
    quiet.add(first.proc.pid)
    supervisor.supervise()  # found silent once: a suspect only
    assert supervisor.children == [first, second] and first.proc.poll() is None
    supervisor.supervise()  # silent again: killed and made again
    assert first.proc.poll() == -signal.SIGKILL
    assert supervisor.children[0] is not first and supervisor.children[1] is second
    assert supervisor.children[0].proc.poll() is None


def test_a_suspect_that_reports_again_is_kept(sleepers: list[subprocess.Popen[bytes]]) -> None:
    quiet: set[int] = set()
    supervisor = Supervisor("worker", 1, lambda _i: sleeper(sleepers),
                            silent=lambda children: quiet & {c.proc.pid for c in children})
    (child,) = supervisor.start()
    for silent_now in (True, False, True, False):
        quiet.clear()
        if silent_now:
            quiet.add(child.proc.pid)
        supervisor.supervise()
    assert supervisor.children == [child] and child.proc.poll() is None


def test_limit_is_the_lease_but_at_least_three_presence_intervals() -> None:
    assert silence_limit(WorkerSettings(lease_seconds=120)) == 120
    assert silence_limit(WorkerSettings(lease_seconds=6, heartbeat_seconds=1)) == 15


# --- serve ------------------------------------------------------------------------------


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def worker_pids(factory: Factory, serve_pid: int) -> set[int]:
    """The pids of the workers that reported in and are children of ``serve_pid``."""
    return {row.pid for row in workers(factory, utcnow()) if parent_of(row.pid) == serve_pid}


def test_serve_replaces_a_sigstopped_worker(tmp_path: Path, factory: Factory,
                                            db_url: str) -> None:
    port = free_port()
    config = write_config(tmp_path / "ainode.toml", port=port, storage=tmp_path / "var",
                          db_url=db_url, workers=1)  # lease_seconds = 6: the limit is 15 s
    node = start_node(config, port, tmp_path / "node.log")
    try:
        (stopped,) = wait_until(lambda: worker_pids(factory, node.proc.pid), 120,
                                what="the worker's presence")
        os.kill(stopped, signal.SIGSTOP)
        paused = time.monotonic()
        wait_until(lambda: parent_of(stopped) is None, 15 + 2 * 2 + 30,
                   what="the stopped worker gone")
        # Silent for the limit since its last presence, written at most 5 s before the stop.
        assert time.monotonic() - paused >= 15 - 5
        (replacement,) = wait_until(lambda: worker_pids(factory, node.proc.pid), 120,
                                    what="a new worker reporting")
        assert replacement != stopped
        assert node.proc.poll() is None
    finally:
        node.stop()
    assert f"pid {stopped}) has stopped reporting" in node.log()
