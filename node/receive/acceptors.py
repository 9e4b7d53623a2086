"""Several acceptor processes behind one DICOM port (``dicom.acceptors`` > 1).

pynetdicom runs every association as Python threads of one process, so one
process receives on one core. With ``dicom.acceptors = N`` the serve process
owns the listening socket: it accepts each connection, checks its source
address, and hands the connected socket over (SCM_RIGHTS on a Unix channel) to
the acceptor process with the fewest open associations. Each acceptor process
(``ainode acceptor``) runs the ordinary SCP with its own journal
(``journal/<host>-<port>-<i>``) and materializer, so an acknowledged instance is
exactly as durable as with one process. An acceptor replays its own journal
before it takes connections, so one that dies is simply started again; the
serve process replays every journal of the node once, before any acceptor runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import selectors
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from db.engine import make_engine, make_session_factory
from db.queue import SessionFactory
from node.errors import StartupError
from node.receive.handoff import ENDED, OUTCOME_BYTES, READY, HandoffServer, encode_address
from node.receive.server import address_allowed, start_receiver
from node.runtime.metrics import ASSOCIATIONS
from node.runtime.supervisor import Supervisor, node_command
from node.settings import Settings
from node.store.ingest import journal_dir, replay

log = logging.getLogger("ainode.acceptors")
HANDOFF_TIMEOUT = 2.0
"""Longest the dispatcher waits to hand a connection to one acceptor before trying another."""


def node_id(settings: Settings, index: int | None = None) -> str:
    """This node's journal name; acceptor ``index`` of several has its own."""
    base = f"{socket.gethostname()}-{settings.dicom.port}"
    return base if index is None else f"{base}-{index}"


def replay_all(settings: Settings, factory: SessionFactory) -> int:
    """Replay every journal of this node: the single-process one and any acceptor's."""
    root = settings.storage.dir
    base = journal_dir(root, node_id(settings))
    folders = [base, *sorted(base.parent.glob(f"{base.name}-*"))] if base.parent.is_dir() \
        else []
    return sum(replay(root, folder, factory) for folder in folders)


@dataclass
class _Acceptor:
    index: int
    proc: subprocess.Popen[bytes]
    channel: socket.socket
    active: int = 0
    alive: bool = True


@dataclass
class AcceptorPool:
    """The listening socket, the dispatcher thread and ``count`` acceptor processes."""

    settings: Settings
    config_path: Path | None
    count: int
    listener: socket.socket | None = None
    stopping: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _selector: selectors.DefaultSelector = field(default_factory=selectors.DefaultSelector)
    _processes: Supervisor[_Acceptor] = field(init=False)

    def __post_init__(self) -> None:
        self._processes = Supervisor("acceptor", self.count, self._spawn, self._exited,
                                     self._lock)

    @property
    def acceptors(self) -> list[_Acceptor]:
        return self._processes.children

    # --- processes ----------------------------------------------------------------------

    def _spawn(self, index: int) -> _Acceptor:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = node_command("acceptor", self.config_path, "--index", str(index),
                           "--channel", str(theirs.fileno()))
        proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()])
        theirs.close()
        ours.settimeout(HANDOFF_TIMEOUT)
        log.info("started acceptor %d, pid %d", index, proc.pid)
        acceptor = _Acceptor(index, proc, ours)
        self._selector.register(ours, selectors.EVENT_READ, acceptor)
        return acceptor

    def start(self, ready_timeout: float = 120.0) -> None:
        """Start the acceptor processes; once each is ready, listen and dispatch."""
        dicom = self.settings.dicom
        self._processes.start()
        for acceptor in self.acceptors:
            acceptor.channel.settimeout(ready_timeout)
            try:
                ready = acceptor.channel.recv(1) == READY
            except OSError:
                ready = False
            acceptor.channel.settimeout(HANDOFF_TIMEOUT)
            if not ready:
                self.stop()
                raise StartupError(f"acceptor {acceptor.index} did not start")
        family = socket.AF_INET6 if ":" in dicom.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((dicom.host, dicom.port))
        listener.listen(128)
        self.listener = listener
        threading.Thread(target=self._dispatch, name="acceptor-dispatch", daemon=True).start()
        threading.Thread(target=self._read, name="acceptor-reader", daemon=True).start()
        log.info("listening on %s:%d for %d acceptor processes", dicom.host, dicom.port,
                 self.count)

    def supervise(self) -> None:
        """Start again an acceptor process that exited (it replays its own journal first)."""
        if not self.stopping:
            self._processes.supervise()

    def _exited(self, acceptor: _Acceptor) -> None:
        acceptor.alive = False
        self._forget(acceptor)

    def _forget(self, acceptor: _Acceptor) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(acceptor.channel)
        acceptor.channel.close()

    def listening(self) -> bool:
        return (self.listener is not None and self.listener.fileno() != -1
                and any(a.alive and a.proc.poll() is None for a in self.acceptors))

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking connections; each acceptor finishes its associations and its journal."""
        self.stopping = True
        if self.listener is not None:
            self.listener.close()
        self._processes.stop(timeout)
        for acceptor in self.acceptors:
            acceptor.channel.close()

    # --- threads ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        assert self.listener is not None
        networks = [ipaddress.ip_network(str(n)) for n in self.settings.dicom.allowed_networks]
        while not self.stopping:
            try:
                conn, address = self.listener.accept()
            except OSError:
                if self.stopping:
                    return
                continue
            try:
                if address_allowed(networks, address):
                    self._hand_over(conn, address)
            finally:
                conn.close()  # the acceptor holds its own copy of the socket

    def _hand_over(self, conn: socket.socket, address: tuple[str, int]) -> None:
        message = encode_address(address)
        with self._lock:
            candidates = sorted((a for a in self.acceptors if a.alive), key=lambda a: a.active)
        for acceptor in candidates:
            try:
                socket.send_fds(acceptor.channel, [message], [conn.fileno()])
            except TimeoutError:  # its channel is full: busy or stuck, try another
                log.warning("acceptor %d is not taking connections", acceptor.index)
                continue
            except OSError:
                with self._lock:
                    acceptor.alive = False
                continue
            with self._lock:
                acceptor.active += 1
            return
        log.error("connection from %s:%s dropped: no acceptor process is running", *address)

    def _read(self) -> None:
        """Count associations that ended; notice an acceptor whose channel closed."""
        while not self.stopping:
            with self._lock:
                registered = bool(self._selector.get_map())
            if not registered:
                time.sleep(0.1)
                continue
            for key, _ in self._selector.select(timeout=0.5):
                acceptor: _Acceptor = key.data
                try:
                    data = acceptor.channel.recv(4096)
                except OSError:
                    data = b""
                for outcome, code in OUTCOME_BYTES.items():
                    if data.count(code):
                        ASSOCIATIONS.labels(outcome).inc(data.count(code))
                with self._lock:
                    if data:
                        ended = data.count(ENDED)
                        acceptor.active = max(0, acceptor.active - ended)
                    else:
                        acceptor.alive = False
                        self._forget(acceptor)


def run_acceptor(settings: Settings, index: int, channel: socket.socket) -> int:
    """``ainode acceptor``: one of several processes taking the node's associations."""
    engine = make_engine(settings.database.url)
    factory = make_session_factory(engine)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    journal = journal_dir(settings.storage.dir, node_id(settings, index))
    replay(settings.storage.dir, journal, factory)
    ingest, server = start_receiver(settings, factory, journal, HandoffServer, channel=channel)
    assert isinstance(server, HandoffServer)
    channel.send(READY)
    try:
        while not stop.is_set() and not server.parent_gone.is_set():
            stop.wait(0.5)
    finally:
        server.shutdown()
        ingest.stop()
        engine.dispose()
    return 0
