"""Durable ingest behind the C-STORE handler: journal first, files and rows right after.

:meth:`Ingest.store` returns only when the instance is durable in the journal
(one group-committed flush). A background thread writes the instance file and
commits the rows in batches. A journal segment is deleted once a file-system
sync has made the files it covers durable. :func:`replay` re-applies leftover
segments at start-up, so an acknowledged instance is never lost, whatever
moment a crash hits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from db.queue import (
    InstanceMeta,
    SessionFactory,
    instance_known,
    record_instances,
)
from node.errors import IngestStopped, StorageError
from node.runtime.faults import crash_point
from node.store.files import write_file
from node.store.journal import Buffer, Payload, Segment, Ticket, parts_of, read_segment, segments

log = logging.getLogger("ainode.ingest")
JOURNAL = "journal"
HELD = "held.json"
"""In a journal folder while its ingest retries: study UIDs it still has to record."""
RETRY_FIRST = 0.2
RETRY_MAX = 5.0
"""Seconds between attempts to write files and rows after an error (doubling)."""
BATCH = 128
BATCH_SECONDS = 0.2


@dataclass
class _Open:
    """A segment and how many of its records still wait to be materialized."""

    segment: Segment
    outstanding: int = 0
    sealed: bool = False


def journal_dir(root: Path, node_id: str) -> Path:
    """This node's journal folder: nodes sharing a storage folder never touch each other's."""
    return root / JOURNAL / node_id


@dataclass
class Ingest:
    root: Path
    journal: Path
    factory: SessionFactory
    clock: Callable[[], datetime]
    segment_bytes: int = 512 * 1024 * 1024
    max_queue: int = 128
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pending: set[str] = field(default_factory=set)
    _current: _Open | None = None
    _segments: dict[Path, _Open] = field(default_factory=dict)
    _queue: queue.Queue[tuple[InstanceMeta, list[Buffer], Path] | None] = field(
        default_factory=queue.Queue)
    _thread: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _inflight_studies: set[str] = field(default_factory=set)
    problem: str | None = None
    """Why files and rows are not being written now (retrying), or None when they are."""

    def start(self) -> None:
        self._queue = queue.Queue(self.max_queue)
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Drain the queue, make everything durable and remove the journal segments.

        While files or rows cannot be written (a retry is running), stopping gives up
        waiting: what is left stays in the journal and is replayed at the next start.
        """
        if self._thread is not None:
            self._stopping.set()
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._current is not None:
                self._current.sealed = True
            self._current = None
        self._retire()

    # --- called by C-STORE handler threads ------------------------------------------

    def store(self, meta: InstanceMeta, data: Payload) -> bool:
        """Make the instance durable; False when the same SOP Instance UID is in flight.

        An instance already in the database is journaled all the same and dropped
        by the writer thread (one query per batch instead of one per instance on the
        association's thread): duplicates are rare, every instance pays the query.
        """
        if self._thread is not None and not self._thread.is_alive():
            raise IngestStopped("the ingest thread stopped")
        with self._lock:
            if meta.sop_uid in self._pending:
                return False
            self._pending.add(meta.sop_uid)
        parts = parts_of(data)
        try:
            opened, ticket = self._append(meta, parts)
            opened.segment.wait_durable(ticket)
        except BaseException:
            with self._lock:
                self._pending.discard(meta.sop_uid)
            raise
        self._queue.put((meta, parts, opened.segment.path))
        return True

    def _append(self, meta: InstanceMeta, parts: list[Buffer]) -> tuple[_Open, Ticket]:
        header = {**asdict(meta), "received_at": self.clock().isoformat()}
        length = sum(len(p) for p in parts)
        with self._lock:
            opened = self._current
            if opened is None or not opened.segment.fits(length + 4096):
                if opened is not None:
                    opened.sealed = True
                size = max(self.segment_bytes, length + 65536)
                opened = _Open(Segment(self.journal, size))
                self._segments[opened.segment.path] = opened
                self._current = opened
            opened.outstanding += 1
        try:
            return opened, opened.segment.append(header, parts)
        except BaseException:
            with self._lock:  # a broken segment is sealed: the next record opens a new one
                opened.outstanding -= 1
                if opened.segment.broken:
                    opened.sealed = True
                    if self._current is opened:
                        self._current = None
            raise

    # --- the materializer thread --------------------------------------------------------

    def _run(self) -> None:
        done = False
        while not done:
            item = self._queue.get()
            batch = []
            deadline = time.monotonic() + BATCH_SECONDS
            while item is not None:
                batch.append(item)
                if len(batch) >= BATCH:
                    break
                try:  # gather a batch: one database commit (one flush) for many instances
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            done = item is None
            if batch and not self._write_until_done(batch):
                return  # stopping while it cannot write: the journal keeps the batch
            self._retire()

    def _write_until_done(self, batch: list[tuple[InstanceMeta, list[Buffer], Path]]) -> bool:
        """Write a batch's files and rows, retrying with backoff through transient errors
        (a database locked by a backup, a full disk, a read-only file system).

        Returns False when asked to stop before it could. While it retries,
        :attr:`problem` says why (``/readyz`` shows it) and C-STOREs are still made
        durable in the journal, so nothing acknowledged is lost.
        """
        delay = RETRY_FIRST
        with self._lock:
            self._inflight_studies = {meta.study_uid for meta, _, _ in batch}
        while True:
            try:
                self._materialize(batch)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:500]
                self._hold_studies()  # before the problem is known: nothing completes them
                if self.problem is None:
                    log.error("ingest: cannot write %d instance(s), retrying: %s", len(batch),
                              reason)
                self.problem = f"cannot write received instances: {reason}"
                if self._stopping.wait(delay):
                    return False
                delay = min(delay * 2, RETRY_MAX)
                continue
            if self.problem is not None:
                log.info("ingest: writing again after: %s", self.problem)
                self.problem = None
                (self.journal / HELD).unlink(missing_ok=True)
            return True

    def _hold_studies(self) -> None:
        """Name the studies with instances not yet recorded, so none is completed on part
        of its instances meanwhile (:func:`held_studies`; any process of the node reads it)."""
        with self._queue.mutex:
            queued = {item[0].study_uid for item in self._queue.queue if item is not None}
        with self._lock:
            studies = sorted(queued | self._inflight_studies)
        try:
            write_file(self.journal, Path(HELD), json.dumps(studies).encode())
        except StorageError as exc:  # a full disk: the completion sweep cannot know then
            log.error("ingest: cannot record the studies on hold: %s", exc)

    def _materialize(self, batch: list[tuple[InstanceMeta, list[Buffer], Path]]) -> None:
        """Files, then rows, in one transaction: a duplicate's file is never rewritten."""

        def write_files(new: list[bool]) -> None:
            for (meta, data, _), fresh in zip(batch, new, strict=True):
                if fresh:
                    write_file(self.root, Path(meta.path), data, sync=False)
                else:
                    log.info("duplicate instance sop=%s from %s: already stored", meta.sop_uid,
                             meta.calling_ae)
            crash_point("ingest.files")

        record_instances(self.factory, [meta for meta, _, _ in batch], self.clock(),
                         before_commit=write_files)
        with self._lock:
            for meta, _, path in batch:
                self._pending.discard(meta.sop_uid)
                self._segments[path].outstanding -= 1

    def _retire(self) -> None:
        """Delete sealed segments whose records are all in files and rows, after a sync."""
        with self._lock:
            done = [o for o in self._segments.values() if o.sealed and o.outstanding == 0]
        if not done:
            return
        os.sync()  # the files written without a flush are now on disk
        with self._lock:
            for opened in done:
                opened.segment.close()
                opened.segment.path.unlink(missing_ok=True)
                del self._segments[opened.segment.path]


def replay(root: Path, journal: Path, factory: SessionFactory) -> int:
    """Re-apply the records of leftover journal segments (after a crash); return how many."""
    (journal / HELD).unlink(missing_ok=True)  # everything it named is recorded below
    count = 0
    for path in segments(journal):
        for header, payload in read_segment(path):
            received = datetime.fromisoformat(str(header.pop("received_at")))
            meta = InstanceMeta(**header)  # type: ignore[arg-type]
            # The file may be missing or incomplete (written without a flush): rewrite it.
            write_file(root, Path(meta.path), payload)
            if not instance_known(factory, meta.sop_uid):
                record_instances(factory, [meta], received)
            count += 1
        os.sync()
        path.unlink()
    if count:
        log.info("journal replay: %d instance(s) re-applied after an unclean stop", count)
    return count


def held_studies(root: Path) -> set[str]:
    """Studies that some ingest of this node has received but not yet recorded."""
    held: set[str] = set()
    for marker in (root / JOURNAL).glob(f"*/{HELD}"):
        with contextlib.suppress(OSError, ValueError):
            held.update(str(uid) for uid in json.loads(marker.read_text()))
    return held
