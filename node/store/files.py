"""Durable file storage: write to a temp file, fsync, rename into place, fsync the folder."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from node.errors import InvalidInstance, StorageError, StorageFull
from node.store.journal import Payload, parts_of

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
INSTANCES = "instances"
RESULTS = "results"


def check_uid(value: object, what: str) -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidInstance`.

    Only digits and dots, at most 64 characters: a UID can never name a path
    outside the storage folder.
    """
    uid = str(value or "").strip().rstrip("\x00")
    if not uid or len(uid) > 64 or not UID_RE.match(uid):
        raise InvalidInstance(f"{what} is missing or not a valid UID")
    return uid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(root: Path, rel: Path) -> Path:
    """Create ``root/rel`` folder by folder, fsyncing each parent whose entries changed."""
    current = root
    for part in rel.parts:
        child = current / part
        if not child.is_dir():
            child.mkdir(exist_ok=True)
            _fsync_dir(current)
        current = child
    return current


def write_file(root: Path, rel: Path, data: Payload, *,
               sync: bool = True) -> int:
    """Write ``data`` (one buffer or several pieces) to ``root/rel`` atomically; return its size.

    The file appears under its final name only once complete (temp file and
    rename). With ``sync`` it is also durable when this returns: the file and
    each folder whose entries changed are flushed, so a crash leaves either no
    file or the whole file (and maybe a ``.tmp`` file that
    :func:`remove_temp_files` cleans up). Without ``sync`` the caller holds
    another durable copy (the ingest journal) and syncs the file system later.
    """
    parts = parts_of(data)
    total = sum(len(p) for p in parts)
    folder = root / rel.parent
    tmp = folder / f".{rel.name}.{uuid.uuid4().hex}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        if sync:
            _make_dirs(root, rel.parent)
        try:
            fd = os.open(tmp, flags, 0o640)
        except FileNotFoundError:  # the series' first instance: make its folder
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, flags, 0o640)
        try:
            written = os.writev(fd, parts)
            if written != total:  # rare (a signal, a full disk): finish piece by piece
                rest = memoryview(b"".join(parts))[written:]
                while rest:
                    rest = rest[os.write(fd, rest):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, folder / rel.name)
        if sync:
            _fsync_dir(folder)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {rel}: {exc.strerror}") from exc
    return total


def ensure_free_space(root: Path, min_free_mb: int) -> None:
    """Raise :class:`StorageFull` when less than ``min_free_mb`` MiB are free under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < min_free_mb * 1024 * 1024:
        raise StorageFull(f"{free // (1024 * 1024)} MiB free, floor is {min_free_mb} MiB")


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Relative path of a received instance (UIDs already checked)."""
    return Path(INSTANCES) / study_uid / series_uid / f"{sop_uid}.dcm"


def result_path(job_id: int, kind: str, sop_uid: str) -> Path:
    return Path(RESULTS) / f"job-{job_id}" / f"{kind}-{sop_uid}.dcm"


def remove_temp_files(root: Path) -> int:
    """Delete leftover ``.tmp`` files of interrupted writes; return how many."""
    count = 0
    for sub in (INSTANCES, RESULTS):
        base = root / sub
        if base.is_dir():
            for tmp in base.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                count += 1
    return count

