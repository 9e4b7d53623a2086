"""A write-ahead journal for received instances, with group commit.

The C-STORE handler appends the encoded instance and its database row (as a
small header) to a preallocated segment file and waits until a single
``fdatasync`` covers its record; only then does it answer success. One flush
makes both the file content and the row durable, and concurrent associations
share flushes. A background thread then writes the instance file and the row
(no flush of its own); a segment is deleted only after a file-system sync and a
fully synced database commit have made everything it holds durable elsewhere.
After a crash, :func:`replay` re-applies every record of the leftover segments,
idempotently.

Record layout: ``MAGIC | header length (u32) | payload length (u64) | CRC32 of
header+payload (u32) | header (JSON) | payload``. A torn record at the end of a
segment (crash during the write) fails its CRC and ends the segment: it was
never acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.errors import JournalWriteError

MAGIC = b"AIJ1"
HEAD = struct.Struct("<4sIQI")
SEGMENT_BYTES = 512 * 1024 * 1024


Buffer = bytes | bytearray | memoryview
Payload = Buffer | Sequence[Buffer]
"""A record's payload: one buffer, or several written back to back (no copy to join them)."""


def parts_of(payload: Payload) -> list[Buffer]:
    return [payload] if isinstance(payload, bytes | bytearray | memoryview) else list(payload)


@dataclass(frozen=True)
class Ticket:
    """A written record: durable once a flush that started after its write has finished."""

    segment: Path
    end: int
    sync_needed: int


class Segment:
    """One preallocated journal file, appended to by many threads, flushed in groups.

    Records are written one at a time, in offset order, so a crash can tear only
    the last one. A record is durable once a flush that *started after its write
    completed* has returned; concurrent writers share such flushes (group commit).
    """

    def __init__(self, folder: Path, size: int = SEGMENT_BYTES) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.journal"
        self.size = size
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        with contextlib.suppress(OSError):  # without fallocate the file grows as written
            os.posix_fallocate(self._fd, 0, size)
        os.fsync(self._fd)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._lock = threading.Lock()
        self._sync = threading.Condition(threading.Lock())
        self._written = 0
        self._syncs_started = 0
        self._syncs_done = 0
        self._syncing = False
        self.broken = False
        self.closed = False

    def fits(self, length: int) -> bool:
        return not self.broken and self._written + HEAD.size + length <= self.size

    def append(self, header: dict[str, object], payload: Payload) -> Ticket:
        """Write one record (not yet durable: pass the ticket to :meth:`wait_durable`)."""
        parts = parts_of(payload)
        head = json.dumps(header, separators=(",", ":")).encode()
        length = sum(len(p) for p in parts)
        crc = zlib.crc32(head)
        for part in parts:
            crc = zlib.crc32(part, crc)
        record = HEAD.pack(MAGIC, len(head), length, crc) + head
        total = len(record) + length
        with self._lock:  # one writer at a time: only the last record can ever be torn
            if self.broken:
                raise JournalWriteError(f"journal segment {self.path.name} is broken")
            offset = self._written
            try:
                written = os.pwritev(self._fd, [record, *parts], offset)
                if written != total:
                    raise JournalWriteError(f"short write ({written} of {total} bytes)")
            except OSError:
                self.broken = True
                raise
            self._written = offset + total
        with self._sync:
            needed = self._syncs_started + 1  # a flush already running may predate the write
        return Ticket(self.path, offset + total, needed)

    def wait_durable(self, ticket: Ticket) -> None:
        """Return once a flush started after the write has finished; one flushes for all."""
        with self._sync:
            while self._syncs_done < ticket.sync_needed:
                if self._syncing:
                    self._sync.wait()
                    continue
                self._syncing = True
                self._syncs_started += 1
                number = self._syncs_started
                self._sync.release()
                try:
                    os.fdatasync(self._fd)
                finally:
                    self._sync.acquire()
                    self._syncing = False
                    self._sync.notify_all()
                self._syncs_done = number

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)


def read_segment(path: Path) -> Iterator[tuple[dict[str, object], bytes]]:
    """The complete records of a segment, in order; stops at the first torn or empty one."""
    with path.open("rb") as handle:
        while True:
            raw = handle.read(HEAD.size)
            if len(raw) < HEAD.size:
                return
            magic, head_len, payload_len, crc = HEAD.unpack(raw)
            if magic != MAGIC:
                return
            head = handle.read(head_len)
            payload = handle.read(payload_len)
            if len(head) < head_len or len(payload) < payload_len:
                return
            if zlib.crc32(payload, zlib.crc32(head)) != crc:
                return
            yield json.loads(head), payload


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.journal"), key=lambda p: p.stat().st_mtime) \
        if folder.is_dir() else []
