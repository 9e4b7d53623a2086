"""Journal-first ingest: what was acknowledged survives a crash before files and rows exist."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.queue import InstanceMeta
from db.schema import Instance
from node.runtime.clock import utcnow
from node.settings import DicomSettings
from node.store.ingest import Ingest, held_studies, journal_dir, replay
from node.store.journal import segments
from tests.peers import CHEST_CT, free_port, storescu, wait_until
from tests.receiver import running_ingest


def metas(n: int) -> list[tuple[InstanceMeta, bytes]]:
    out = []
    for path in sorted(CHEST_CT.glob("*.dcm"))[:n]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        data = path.read_bytes()
        out.append((InstanceMeta(
            study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
            sop_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            transfer_syntax="1.2.840.10008.1.2.1", path=f"instances/{ds.SOPInstanceUID}.dcm",
            size=len(data), calling_ae="T", modality="CT"), data))
    return out


def rows(factory: sessionmaker[Session]) -> int:
    with factory() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def test_crash_after_acknowledgement_is_replayed(tmp_path: Path,
                                                 factory: sessionmaker[Session]) -> None:
    root = tmp_path / "store"
    journal = journal_dir(root, "node-a")
    crashed = Ingest(root, journal, factory, utcnow)  # its writer thread never runs: a crash
    items = metas(3)
    for meta, data in items:
        assert crashed.store(meta, data)  # returned: durable in the journal
    assert rows(factory) == 0 and not list(root.glob("instances/*.dcm"))
    assert len(segments(journal)) == 1

    assert replay(root, journal, factory) == 3
    assert rows(factory) == 3
    for meta, data in items:
        assert (root / meta.path).read_bytes() == data
    assert segments(journal) == []
    assert replay(root, journal, factory) == 0  # idempotent, nothing left


def test_running_ingest_writes_files_rows_and_drops_the_journal(
        tmp_path: Path, factory: sessionmaker[Session]) -> None:
    root = tmp_path / "store"
    ingest = Ingest(root, journal_dir(root, "node-a"), factory, utcnow)
    ingest.start()
    items = metas(5)
    for meta, data in items:
        assert ingest.store(meta, data)
    ingest.store(*items[0])  # a duplicate SOP Instance UID, in flight or already recorded
    ingest.stop()
    restarted = Ingest(root, journal_dir(root, "node-a"), factory, utcnow)
    restarted.start()
    assert restarted.store(*items[1])  # journaled, then dropped as already recorded
    restarted.stop()
    assert rows(factory) == 5
    assert all((root / m.path).read_bytes() == d for m, d in items)
    assert len(list(root.glob("instances/*.dcm"))) == 5
    assert segments(journal_dir(root, "node-a")) == []


def test_other_nodes_journals_are_left_alone(tmp_path: Path,
                                             factory: sessionmaker[Session]) -> None:
    root = tmp_path / "store"
    other = Ingest(root, journal_dir(root, "node-b"), factory, utcnow)
    other.store(*metas(1)[0])
    assert replay(root, journal_dir(root, "node-a"), factory) == 0
    assert len(segments(journal_dir(root, "node-b"))) == 1


def test_a_failed_journal_write_is_refused_and_the_next_instance_opens_a_new_segment(
        tmp_path: Path, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "store"
    journal = journal_dir(root, "node-a")
    crashed = Ingest(root, journal, factory, utcnow)  # no writer thread: the journal stays
    (first, data1), (second, data2), (third, data3) = metas(3)
    assert crashed.store(first, data1)
    real_write = os.pwritev

    def failing(fd: int, buffers: list[bytes], offset: int) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "pwritev", failing)
    with pytest.raises(OSError):
        crashed.store(second, data2)  # the SCP answers 0xA700: not acknowledged
    monkeypatch.setattr(os, "pwritev", real_write)
    assert crashed.store(third, data3)
    assert len(segments(journal)) == 2  # the broken segment takes nothing more
    assert replay(root, journal, factory) == 2
    with factory() as s:
        assert set(s.scalars(select(Instance.sop_uid))) == {first.sop_uid, third.sop_uid}


def test_a_write_fault_is_retried_until_it_clears_without_a_restart(
        tmp_path: Path, factory: sessionmaker[Session]) -> None:
    """Files cannot be written for a while (as with a full disk): every C-STORE is still
    acknowledged only once durable, nothing is lost, the study is held from completion,
    and everything lands once the fault clears, without a restart."""
    root = tmp_path / "store"
    blocker = root / "instances"  # a file where the instances' folder goes: writes fail
    port = free_port()
    with running_ingest(root, factory, DicomSettings(host="127.0.0.1", port=port)
                        ) as (ingest, _server):
        blocker.write_bytes(b"")
        files = sorted(CHEST_CT.glob("*.dcm"))[:3]
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert storescu(port, files).returncode == 0  # acknowledged: durable in the journal
        wait_until(lambda: ingest.problem is not None, 10, what="the fault reported")
        assert "cannot write received instances" in str(ingest.problem)
        assert rows(factory) == 0
        assert held_studies(root) == {study}  # the completion sweep leaves it alone
        blocker.unlink()
        wait_until(lambda: rows(factory) == 3, 20, what="the 3 instances recorded")
        wait_until(lambda: ingest.problem is None, 5, what="the fault cleared")
        assert held_studies(root) == set()
        assert storescu(port, sorted(CHEST_CT.glob("*.dcm"))[3]).returncode == 0
        wait_until(lambda: rows(factory) == 4, 10, what="a 4th instance")
    assert not list((root / "journal").rglob("*.journal"))
