"""``ainode serve``: the receiver, the scheduler and the supervised worker processes.

:func:`check_startup` is every check of a configuration that serve makes at start;
``ainode check-config`` runs the same one, and serve runs it before it creates,
migrates or binds anything.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
from pathlib import Path
from types import FrameType

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from db.engine import make_engine, make_session_factory, sqlite_file
from db.migrate import upgrade
from models.base import ModelError
from node.admin.auth import load_credentials
from node.admin.server import listening, start_admin, tls_problems
from node.errors import ConfigError
from node.infer.plugins import available_models
from node.receive.acceptors import AcceptorPool, node_id, replay_all
from node.receive.server import ReceiverServer, fast_path, start_receiver
from node.runtime.clock import utcnow
from node.runtime.scheduler import make_scheduler
from node.runtime.supervisor import silence_limit, silent_workers, worker_supervisor
from node.settings import Settings
from node.store.files import remove_temp_files
from node.store.ingest import Ingest, held_studies, journal_dir
from node.tls import client_context, server_context

log = logging.getLogger("ainode.serve")


# --- start-up checks -------------------------------------------------------------------


def _model_problems(settings: Settings) -> list[str]:
    """Configured models load their weights (file and hash); routes name installed models."""
    try:
        known = available_models(settings)
    except ConfigError as exc:
        return [str(exc)]
    problems = []
    for model in settings.models:
        try:
            known[model.name]()
        except (ConfigError, ModelError, ValueError, OSError) as exc:
            problems.append(f"models: {model.name}: {exc}")
    missing = sorted({m for r in settings.routes for m in r.models} - set(known))
    if missing:
        problems.append(f"routes name unknown model(s) {', '.join(missing)}; "
                        f"installed: {', '.join(sorted(known))}")
    return problems


def _tls_files(settings: Settings) -> list[tuple[str, Path | None]]:
    """The TLS files serve loads: the SCP's, and each TLS destination's."""
    own = settings.dicom.tls
    files: list[tuple[str, Path | None]] = []
    if own.enabled:
        files += [("dicom.tls.cert", own.cert), ("dicom.tls.key", own.key),
                  ("dicom.tls.ca", own.ca)]
    for i, dest in enumerate(settings.destinations):
        if dest.tls.enabled:
            key = f"destinations[{i}].tls"
            files += [(f"{key}.ca", dest.tls.ca), (f"{key}.cert", dest.tls.cert or own.cert),
                      (f"{key}.key", dest.tls.key or own.key)]
    return files


def _tls_problems(settings: Settings) -> list[str]:
    """Every TLS file is there, and the SSL contexts load them (certificate, key, CA)."""
    problems = [f"{key}: {path}: not a readable file" for key, path in _tls_files(settings)
                if path is not None and not (path.is_file() and os.access(path, os.R_OK))]
    if problems:
        return problems
    try:
        if settings.dicom.tls.enabled:
            server_context(settings.dicom.tls)
        for dest in settings.destinations:
            if dest.tls.enabled:
                client_context(dest.tls, settings.dicom.tls)
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


def _admin_problems(settings: Settings) -> list[str]:
    """The admin server's credentials load, and it is not open off loopback without them;
    its TLS certificate and key (when set) are there and load together."""
    if not settings.admin.enabled:
        return []
    problems = tls_problems(settings.admin)
    try:
        load_credentials(settings.admin)
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


def _writable_dir_problems(key: str, path: Path) -> list[str]:
    """``path`` is (or can be created as) a folder we can write into."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"{key}: {path}: {existing} is not a folder"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{key}: {path}: {existing} is not writable"]
    return []


def _database_problems(settings: Settings) -> list[str]:
    """The database URL parses and its driver is installed; a SQLite file can be written."""
    url = settings.database.url
    try:
        make_url(url).get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        return [f"database.url: {exc}"]
    path = sqlite_file(url) if make_url(url).get_backend_name() == "sqlite" else None
    if path is None:
        return []
    if path.exists():
        if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
            return [f"database.url: {path} is not a writable file"]
        return []
    return _writable_dir_problems("database.url", path.parent)


def startup_problems(settings: Settings) -> list[str]:
    """What would stop ``serve`` with these settings, each naming its key; empty when none."""
    return [*_model_problems(settings), *_tls_problems(settings), *_admin_problems(settings),
            *_writable_dir_problems("storage.dir", settings.storage.dir),
            *_database_problems(settings)]


def check_startup(settings: Settings) -> None:
    """Every start-up check of serve (and of ``ainode check-config``); ConfigError if any fails."""
    problems = startup_problems(settings)
    if problems:
        raise ConfigError("; ".join(problems))


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
