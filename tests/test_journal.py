"""The write-ahead journal: group commit, torn records, replay."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from node.journal import HEAD, Segment, read_segment, segments


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
