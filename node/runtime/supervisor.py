"""Child processes of the node (workers, acceptors), each restarted when it exits.

One supervisor per role: ``serve`` polls :meth:`Supervisor.supervise` from its
scheduler, and :meth:`Supervisor.stop` sends SIGTERM to every child (each
finishes what it holds) and kills what is left after a timeout. A child that
is still there but has stopped reporting (SIGSTOPped, or hung outside a job) is
killed with SIGKILL and made again; for workers, reporting is the presence row
each writes between jobs and the heartbeat of the job in hand
(:func:`silent_workers`).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from db.admin import PRESENCE_EVERY, workers
from db.queue import SessionFactory
from node.runtime.clock import utcnow
from node.settings import WorkerSettings

log = logging.getLogger("ainode.supervisor")

STARTUP_SECONDS = 120.0
"""How long a new worker may take to report for the first time (imports, database)."""
KILL_WAIT_SECONDS = 10.0


class Child(Protocol):
    @property
    def proc(self) -> subprocess.Popen[bytes]: ...


C = TypeVar("C", bound=Child)


@dataclass(frozen=True)
class Process:
    """A child that is just its process, and when it was started (UTC)."""

    proc: subprocess.Popen[bytes]
    started_at: datetime = field(default_factory=utcnow)


def node_command(command: str, config_path: Path | None, *args: str) -> list[str]:
    """The command line of an ``ainode`` subcommand run with this interpreter."""
    cmd = [sys.executable, "-m", "node.cli", command, *args]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    return cmd


def _no_cleanup(_child: object) -> None:
    pass


def _none_silent(_children: Sequence[object]) -> set[int]:
    return set()


@dataclass
class Supervisor(Generic[C]):
    """``count`` children made by ``spawn(index)``; one that exits is made again.

    ``on_exit`` runs (under ``lock``) for a child that exited, before its
    replacement is spawned; ``lock`` is shared with whoever reads ``children``.
    ``silent(children)`` gives the pids of children that stopped reporting; one
    found silent at two checks in a row is killed (SIGKILL) and made again.
    """

    role: str
    count: int
    spawn: Callable[[int], C]
    on_exit: Callable[[C], None] = _no_cleanup
    lock: threading.Lock = field(default_factory=threading.Lock)
    children: list[C] = field(default_factory=list)
    stopping: bool = False
    silent: Callable[[Sequence[C]], set[int]] = _none_silent
    _suspects: set[int] = field(default_factory=set)

    def start(self) -> list[C]:
        self.children = [self.spawn(i) for i in range(self.count)]
        return self.children

    def supervise(self) -> None:
        """Restart children that exited, or stopped reporting, while the node is running."""
        if self.stopping:
            return
        for i, child in enumerate(self.children):
            code = child.proc.poll()
            if code is None:
                continue
            log.error("%s %d (pid %d) exited with %d: restarting it", self.role, i,
                      child.proc.pid, code)
            self._replace(i, child)
        self._replace_silent()

    def _replace(self, index: int, child: C) -> None:
        with self.lock:
            self.on_exit(child)
            self.children[index] = self.spawn(index)

    def _replace_silent(self) -> None:
        """Kill and make again the children found silent at this check and the one before."""
        silent = self.silent(self.children) if self.children else set()
        confirmed = silent & self._suspects
        self._suspects = silent - confirmed
        for i, child in enumerate(self.children):
            if child.proc.pid not in confirmed:
                continue
            log.error("%s %d (pid %d) has stopped reporting (stopped or hung): killing and "
                      "restarting it", self.role, i, child.proc.pid)
            child.proc.kill()
            try:
                child.proc.wait(KILL_WAIT_SECONDS)
            except subprocess.TimeoutExpired:  # e.g. blocked in a driver: the next checks retry
                log.error("%s %d (pid %d) did not die of SIGKILL in %.0f s", self.role, i,
                          child.proc.pid, KILL_WAIT_SECONDS)
                continue
            self._replace(i, child)

    def stop(self, timeout: float) -> None:
        """SIGTERM every child (each finishes what it holds), then kill what is left."""
        self.stopping = True
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.terminate()
        for i, child in enumerate(self.children):
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("%s %d (pid %d) did not stop in %.0f s: killing it", self.role, i,
                          child.proc.pid, timeout)
                child.proc.kill()
                child.proc.wait()


def silence_limit(settings: WorkerSettings) -> float:
    """Seconds without a report after which a worker is stopped or hung: ``lease_seconds``,
    but at least three presence intervals (a worker writes its presence every 5 s)."""
    return max(settings.lease_seconds, 3 * PRESENCE_EVERY.total_seconds())


def silent_workers(factory: SessionFactory, clock: Callable[[], datetime], limit: float,
                   startup: float = STARTUP_SECONDS) -> Callable[[Sequence[Process]], set[int]]:
    """The workers (on this host) that have not reported for ``limit`` seconds.

    A worker reports by its presence row (between jobs) and by the heartbeat that
    keeps its job's lease alive (during one). One that has not reported since it
    was started gets ``startup`` seconds for its first report.
    """
    host = socket.gethostname()

    def silent(children: Sequence[Process]) -> set[int]:
        now = clock()
        try:
            rows = {row.owner: row for row in workers(factory, now)}
        except SQLAlchemyError as exc:  # the database is unreachable: no judgement now
            log.warning("cannot read worker presence: %s", exc)
            return set()
        found = set()
        for child in children:
            row = rows.get(f"{host}:{child.proc.pid}")
            if row is not None and row.job_id is not None:
                continue  # its job's lease is alive: the heartbeat runs
            if row is not None and row.seen_at >= child.started_at:
                last, allowed = row.seen_at, limit
            else:
                last, allowed = child.started_at, max(startup, limit)
            if now - last > timedelta(seconds=allowed):
                found.add(child.proc.pid)
        return found

    return silent


def worker_supervisor(count: int, config_path: Path | None,
                      silent: Callable[[Sequence[Process]], set[int]] = _none_silent
                      ) -> Supervisor[Process]:
    """``count`` worker processes (``ainode worker``); ``silent`` finds the stopped or hung
    ones (see :func:`silent_workers`)."""

    def spawn(_index: int) -> Process:
        proc = subprocess.Popen(node_command("worker", config_path))
        log.info("started worker process pid %d", proc.pid)
        return Process(proc)

    return Supervisor("worker", count, spawn, silent=silent)
