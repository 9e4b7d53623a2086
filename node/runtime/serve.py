"""``ainode serve``: the receiver, the scheduler and the supervised worker processes.

Serve runs :func:`node.runtime.startup.check_startup` before it creates, migrates or
binds anything.
"""

from __future__ import annotations

import logging
import resource
import signal
import threading
from pathlib import Path
from types import FrameType

from sqlalchemy import Engine

from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from node.admin.server import listening, start_admin
from node.receive.acceptors import AcceptorPool, node_id, replay_all
from node.receive.server import ReceiverServer, fast_path, start_receiver
from node.runtime.clock import utcnow
from node.runtime.scheduler import make_scheduler
from node.runtime.startup import check_startup
from node.runtime.supervisor import silence_limit, silent_workers, worker_supervisor
from node.settings import Settings
from node.store.files import remove_temp_files
from node.store.ingest import Ingest, held_studies, journal_dir

log = logging.getLogger("ainode.serve")


# --- serve ------------------------------------------------------------------------------

NR_OPEN = 1 << 20
"""Linux's default ceiling on open files, used when the hard limit is unlimited."""


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one (the admin server and the
    receiver share the process's descriptors; each bounds its own connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NR_OPEN if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files limit stays %d: cannot raise it to %d: %s", soft, target, exc)
        return
    log.info("open files limit raised from %d to %d", soft, target)


def prepare(settings: Settings) -> Engine:
    """Create the storage folder, migrate the database and clean interrupted writes."""
    settings.storage.dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database.url)
    removed = remove_temp_files(settings.storage.dir)
    if removed:
        log.info("removed %d temp file(s) of interrupted writes", removed)
    return make_engine(settings.database.url)


def serve(settings: Settings, config_path: Path | None, stop_timeout: float = 60.0) -> int:
    """Run the node until SIGTERM or SIGINT; return the exit code.

    Raises :class:`ConfigError` before it creates, migrates or binds anything when a
    start-up check fails (:func:`check_startup`).
    """
    check_startup(settings)
    raise_open_files_limit()
    engine = prepare(settings)
    factory = make_session_factory(engine)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    replay_all(settings, factory)
    ingest: Ingest | None = None
    server: ReceiverServer | None = None
    acceptors: AcceptorPool | None = None
    if settings.dicom.acceptors > 1 and fast_path(settings.dicom):
        acceptors = AcceptorPool(settings, config_path, settings.dicom.acceptors)
        acceptors.start()
        is_listening = acceptors.listening
    else:
        if settings.dicom.acceptors > 1:
            log.warning("dicom.acceptors = %d needs the fast path (dicom.fast_path and a "
                        "supported pynetdicom): receiving in one process",
                        settings.dicom.acceptors)
        ingest, server = start_receiver(
            settings, factory, journal_dir(settings.storage.dir, node_id(settings)))
        is_listening = listening(server)

    def receiver_problem() -> str | None:
        if not is_listening():
            return f"port {settings.dicom.port} not listening"
        if ingest is not None and ingest.problem is not None:
            return ingest.problem
        if held_studies(settings.storage.dir):
            return "received instances not yet recorded: an acceptor's ingest is retrying"
        return None

    admin = start_admin(settings, factory, receiver_problem=receiver_problem)
    scheduler = make_scheduler(settings, factory, utcnow)
    pool = worker_supervisor(settings.workers.count, config_path, silent_workers(
        factory, utcnow, silence_limit(settings.workers)))
    scheduler.add_job(pool.supervise, "interval", seconds=2, id="supervise-workers")
    if acceptors is not None:
        scheduler.add_job(acceptors.supervise, "interval", seconds=1, id="supervise-acceptors")
    pool.start()
    scheduler.start()
    log.info("ainode serving: AE %s on port %d, %d worker(s), %d route(s), %d destination(s)",
             settings.dicom.ae_title, settings.dicom.port, settings.workers.count,
             len(settings.routes), len(settings.destinations))
    try:
        stop.wait()
    finally:
        if admin is not None:
            admin.stop()
        if server is not None:
            server.shutdown()
        if ingest is not None:
            ingest.stop()
        if acceptors is not None:
            acceptors.stop(stop_timeout)
        pool.stop(stop_timeout)
        scheduler.shutdown(wait=True)
        engine.dispose()
        log.info("ainode stopped")
    return 0
