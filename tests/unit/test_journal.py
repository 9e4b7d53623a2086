"""The write-ahead journal: group commit, torn records, replay."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from node.errors import JournalWriteError
from node.store.journal import HEAD, Segment, read_segment, segments


def test_records_round_trip_and_concurrent_appends_share_flushes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    segment = Segment(tmp_path / "j", size=64 * 1024 * 1024)
    payloads = {i: os.urandom(1000 + i) for i in range(200)}
    flushes = 0
    real = os.fdatasync

    def counting(fd: int) -> None:
        nonlocal flushes
        flushes += 1
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)

    def writer(ids: range) -> None:
        for i in ids:
            segment.wait_durable(segment.append({"i": i}, payloads[i]))

    threads = [threading.Thread(target=writer, args=(range(k, 200, 8),)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = {int(str(h["i"])): p for h, p in read_segment(segment.path)}
    assert got == payloads
    assert 0 < flushes < 200  # group commit: fewer flushes than records
    segment.close()


def test_torn_record_ends_the_segment(tmp_path: Path) -> None:
    segment = Segment(tmp_path / "j", size=1024 * 1024)
    first = segment.append({"n": 1}, b"a" * 100)
    second = segment.append({"n": 2}, b"b" * 100)
    segment.wait_durable(second)
    segment.close()
    data = bytearray(segment.path.read_bytes())
    data[second.end - 5] ^= 0xFF  # corrupt the last record's payload
    segment.path.write_bytes(bytes(data))
    assert [h["n"] for h, _ in read_segment(segment.path)] == [1]
    assert first.end > HEAD.size
    assert segments(tmp_path / "j") == [segment.path]


def test_a_record_is_durable_only_after_a_flush_that_started_after_its_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit must not count a flush that began while a record was still being written."""
    segment = Segment(tmp_path / "j", size=64 * 1024 * 1024)
    syncs: list[tuple[float, float]] = []
    real_sync, real_write = os.fdatasync, os.pwritev

    def timed_sync(fd: int) -> None:
        started = time.perf_counter()
        real_sync(fd)
        syncs.append((started, time.perf_counter()))

    def slow_write(fd: int, buffers: list[bytes], offset: int) -> int:
        time.sleep(0.002)  # widen the window in which another thread's flush can start
        return real_write(fd, buffers, offset)

    monkeypatch.setattr(os, "fdatasync", timed_sync)
    monkeypatch.setattr(os, "pwritev", slow_write)
    records: list[tuple[float, float]] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(n):
            ticket = segment.append({"i": i}, os.urandom(2000))
            written = time.perf_counter()
            segment.wait_durable(ticket)
            with lock:
                records.append((written, time.perf_counter()))

    threads = [threading.Thread(target=writer, args=(25,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(records) == 150
    for written, returned in records:
        assert any(written <= start and end <= returned for start, end in syncs), \
            "wait_durable returned without a flush that started after the write"
    segment.close()


def test_a_failed_write_breaks_the_segment_and_ingest_moves_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    segment = Segment(tmp_path / "j", size=1024 * 1024)
    segment.wait_durable(segment.append({"n": 1}, b"a" * 100))
    real_write = os.pwritev

    def short(fd: int, buffers: list[bytes], offset: int) -> int:
        return real_write(fd, [b"".join(buffers)[:10]], offset)  # torn: 10 bytes only

    monkeypatch.setattr(os, "pwritev", short)
    with pytest.raises(JournalWriteError):
        segment.append({"n": 2}, b"b" * 100)
    monkeypatch.setattr(os, "pwritev", real_write)
    assert segment.broken and not segment.fits(1)
    with pytest.raises(JournalWriteError):  # nothing lands after the torn record
        segment.append({"n": 3}, b"c" * 100)
    assert [h["n"] for h, _ in read_segment(segment.path)] == [1]
    segment.close()


def test_payload_in_pieces_is_one_record(tmp_path: Path) -> None:
    segment = Segment(tmp_path / "j", size=1024 * 1024)
    data = os.urandom(5000)
    segment.wait_durable(segment.append({"n": 1}, [data[:128], memoryview(data)[128:]]))
    assert [p for _, p in read_segment(segment.path)] == [data]
    segment.close()
