"""Every check of a configuration that ``serve`` makes at start, each problem naming its key.

``ainode check-config`` runs the same checks, and serve runs them before it creates,
migrates or binds anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from db.engine import sqlite_file
from models.base import ModelError
from node.admin.auth import load_credentials
from node.admin.server import tls_problems
from node.errors import ConfigError
from node.infer.plugins import available_models
from node.settings import Settings
from node.tls import client_context, server_context, unreadable


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
    problems = unreadable(_tls_files(settings))
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
