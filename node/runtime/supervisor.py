"""Child processes of the node (workers, acceptors), each restarted when it exits.

One supervisor per role: ``serve`` polls :meth:`Supervisor.supervise` from its
scheduler, and :meth:`Supervisor.stop` sends SIGTERM to every child (each
finishes what it holds) and kills what is left after a timeout.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("ainode.supervisor")


class Child(Protocol):
    @property
    def proc(self) -> subprocess.Popen[bytes]: ...


C = TypeVar("C", bound=Child)


@dataclass(frozen=True)
class Process:
    """A child that is just its process."""

    proc: subprocess.Popen[bytes]


def node_command(command: str, config_path: Path | None, *args: str) -> list[str]:
    """The command line of an ``ainode`` subcommand run with this interpreter."""
    cmd = [sys.executable, "-m", "node.cli", command, *args]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    return cmd


def _no_cleanup(_child: object) -> None:
    pass


@dataclass
class Supervisor(Generic[C]):
    """``count`` children made by ``spawn(index)``; one that exits is made again.

    ``on_exit`` runs (under ``lock``) for a child that exited, before its
    replacement is spawned; ``lock`` is shared with whoever reads ``children``.
    """

    role: str
    count: int
    spawn: Callable[[int], C]
    on_exit: Callable[[C], None] = _no_cleanup
    lock: threading.Lock = field(default_factory=threading.Lock)
    children: list[C] = field(default_factory=list)
    stopping: bool = False

    def start(self) -> list[C]:
        self.children = [self.spawn(i) for i in range(self.count)]
        return self.children

    def supervise(self) -> None:
        """Restart children that exited while the node is running."""
        if self.stopping:
            return
        for i, child in enumerate(self.children):
            code = child.proc.poll()
            if code is None:
                continue
            log.error("%s %d (pid %d) exited with %d: restarting it", self.role, i,
                      child.proc.pid, code)
            with self.lock:
                self.on_exit(child)
                self.children[i] = self.spawn(i)

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


def worker_supervisor(count: int, config_path: Path | None) -> Supervisor[Process]:
    """``count`` worker processes (``ainode worker``)."""

    def spawn(_index: int) -> Process:
        proc = subprocess.Popen(node_command("worker", config_path))
        log.info("started worker process pid %d", proc.pid)
        return Process(proc)

    return Supervisor("worker", count, spawn)
