"""The receiver against real dcmtk senders, on a real SQLite file and a temp folder."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from sqlalchemy import select

from db.schema import Instance
from node.receive.reactor import EventDrivenAssociation, check_supported, store_response_command
from node.receive.scp import file_meta_header
from node.settings import DicomSettings, StorageSettings
from tests.conftest import Factory
from tests.peers import (
    CHEST_CT,
    SAMPLES,
    dcmtk_env,
    echoscu,
    free_port,
    storescu,
    wait_until,
)
from tests.receiver import running_receiver, settled_count


@contextmanager
def serve(tmp_path: Path, factory: Factory, min_free: int = 1, max_bytes: int = 2**31,
          **dicom: object) -> Iterator[tuple[int, StorageSettings]]:
    """The receiver as ``serve`` runs it (journal-first ingest) on a port of its own."""
    port = free_port()
    storage = StorageSettings(dir=tmp_path / "store", min_free_mb=min_free)
    settings = DicomSettings(host="127.0.0.1", port=port, **dicom)  # type: ignore[arg-type]
    with running_receiver(storage.dir, factory, settings, min_free_mb=min_free,
                          max_instance_mb=max_bytes / 2**20):
        yield port, storage
    assert not list((storage.dir / "journal").rglob("*.journal"))


@pytest.fixture
def scp(tmp_path: Path, factory: Factory) -> Iterator[tuple[int, StorageSettings]]:
    with serve(tmp_path, factory) as running:
        yield running


def count(factory: Factory) -> int:
    return settled_count(factory)


def test_stores_series_durably_as_received(scp: tuple[int, StorageSettings],
                                          factory: Factory) -> None:
    port, storage = scp
    files = sorted(CHEST_CT.glob("*.dcm"))[:5]
    out = storescu(port, files)
    assert out.returncode == 0, out.stderr
    assert count(factory) == 5
    with factory() as s:
        rows = s.scalars(select(Instance)).all()
    for row in rows:
        stored = pydicom.dcmread(storage.dir / row.path)
        source = next(f for f in files
                      if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == row.sop_uid)
        original = pydicom.dcmread(source)
        assert stored.file_meta.MediaStorageSOPInstanceUID == row.sop_uid
        assert stored.PixelData == original.PixelData  # not decoded nor re-encoded
    assert not list(storage.dir.rglob("*.tmp"))


def test_duplicate_is_accepted_and_stored_once(scp: tuple[int, StorageSettings],
                                               factory: Factory) -> None:
    port, storage = scp
    one = sorted(CHEST_CT.glob("*.dcm"))[0]
    assert storescu(port, one).returncode == 0
    assert storescu(port, one).returncode == 0
    assert count(factory) == 1
    assert len(list(storage.dir.rglob("*.dcm"))) == 1


@pytest.mark.parametrize(("path", "option"), [
    ("chest-xray/RG1_J2KI.dcm", "-xw"),  # JPEG 2000 (lossy)
    ("chest-xray/RG1_JLSN.dcm", "-xu"),  # JPEG-LS near-lossless
    ("chest-xray/DX_chest_PA_Canon_966_fixed.dcm", "-xv"),  # JPEG 2000 lossless
    ("compressed-misc/RG2_JPLL.dcm", "-xs"),  # JPEG lossless SV1
    ("compressed-misc/CT1_JLSN.dcm", "-xu"),
    ("multiframe/eCT_Supplemental.dcm", "-xe"),  # enhanced CT, explicit VR LE
])
def test_compressed_transfer_syntaxes_are_stored_as_received(
        scp: tuple[int, StorageSettings], factory: Factory, path: str, option: str) -> None:
    port, storage = scp
    source = SAMPLES / path
    out = storescu(port, source, extra=(option,))
    assert out.returncode == 0, out.stderr
    assert count(factory) == 1
    stored = pydicom.dcmread(next(storage.dir.rglob("*.dcm")))
    original = pydicom.dcmread(source)
    assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert stored.PixelData == original.PixelData


def test_unknown_calling_ae_is_rejected(tmp_path: Path, factory: Factory,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with serve(tmp_path, factory, allowed_calling_ae_titles=["PACS"]) as (port, _):
        with caplog.at_level(logging.WARNING, logger="ainode.scp"):
            assert echoscu(port, aet="INTRUDER") != 0
            assert echoscu(port, aet="PACS") == 0
        assert any("association rejected" in r.getMessage() and "INTRUDER" in r.getMessage()
                   for r in caplog.records)


def test_corrupt_file_gets_a_failure_status_and_node_keeps_running(
        scp: tuple[int, StorageSettings], factory: Factory, tmp_path: Path) -> None:
    port, _ = scp
    bad = tmp_path / "bad.dcm"
    ds = pydicom.dcmread(sorted(CHEST_CT.glob("*.dcm"))[0])
    del ds.StudyInstanceUID  # an instance the node cannot file
    ds.save_as(bad)
    out = storescu(port, bad)
    assert "cannotunderstand" in (out.stdout + out.stderr).lower()  # 0xC210
    assert count(factory) == 0
    assert echoscu(port) == 0
    assert storescu(port, sorted(CHEST_CT.glob("*.dcm"))[1]).returncode == 0
    assert count(factory) == 1


def test_path_escaping_uid_is_refused(scp: tuple[int, StorageSettings], factory: Factory,
                                      tmp_path: Path) -> None:
    port, _ = scp
    bad = tmp_path / "escape.dcm"
    ds = pydicom.dcmread(sorted(CHEST_CT.glob("*.dcm"))[0])
    ds.SeriesInstanceUID = "../../../../tmp/evil"
    ds.save_as(bad)
    out = storescu(port, bad)
    assert "cannotunderstand" in (out.stdout + out.stderr).lower()  # 0xC210
    assert count(factory) == 0
    assert not (tmp_path / "tmp").exists()


def test_full_disk_answers_out_of_resources(tmp_path: Path, factory: Factory) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    with serve(tmp_path, factory, min_free=free_mb + 1024 * 1024) as (port, storage):
        out = storescu(port, sorted(CHEST_CT.glob("*.dcm"))[0])
        assert "outofresources" in (out.stdout + out.stderr).lower()  # 0xA700
        assert count(factory) == 0
        assert not list(storage.dir.rglob("*.dcm"))


def test_connections_from_outside_the_allowed_networks_are_refused(
        tmp_path: Path, factory: Factory, caplog: pytest.LogCaptureFixture) -> None:
    with serve(tmp_path, factory, allowed_networks=["10.99.0.0/16"]) as (port, _):
        with caplog.at_level(logging.WARNING, logger="ainode.scp"):
            assert echoscu(port) != 0  # 127.0.0.1 is not in 10.99.0.0/16
        assert any("not in dicom.allowed_networks" in r.getMessage() for r in caplog.records)
    with serve(tmp_path, factory, allowed_networks=["127.0.0.0/8"]) as (port, _):
        assert echoscu(port) == 0


def test_calling_ae_restricted_to_its_networks(tmp_path: Path, factory: Factory,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with serve(tmp_path, factory, ae_networks={"PACS": ["10.99.0.0/16"]}) as (port, _):
        with caplog.at_level(logging.WARNING, logger="ainode.scp"):
            refused = subprocess.run(  # PACS may only come from 10.99/16
                ["echoscu", "-aet", "PACS", "-aec", "AINODE", "127.0.0.1", str(port)],
                capture_output=True, text=True, timeout=30, env=dcmtk_env())
            assert refused.returncode != 0
            assert "Association Rejected" in refused.stdout + refused.stderr  # not an abort
            assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
            assert echoscu(port, aet="OTHER") == 0  # not restricted
        assert any("dicom.ae_networks" in r.getMessage() for r in caplog.records)


def test_oversized_instance_is_refused(tmp_path: Path, factory: Factory) -> None:
    with serve(tmp_path, factory, max_bytes=100_000) as (port, storage):
        out = storescu(port, sorted(CHEST_CT.glob("*.dcm"))[0])  # about 525 kB
        assert "outofresources" in (out.stdout + out.stderr).lower()  # 0xA700
        assert count(factory) == 0 and not list(storage.dir.rglob("*.dcm"))


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),
    ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.45", "1.2.840.10008.1.2"),
    ("1.2.840.10008.5.1.4.1.1.7", "1.2.826.0.1.3680043.8.498." + "1" * 37,
     "1.2.840.10008.1.2.4.50"),
])
def test_file_meta_header_is_what_pynetdicom_encodes(sop_class: str, sop_instance: str,
                                                      syntax: str) -> None:
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax))
    assert file_meta_header(sop_class, sop_instance, syntax) == expected


def test_associations_run_on_the_event_driven_loops(scp: tuple[int, StorageSettings],
                                                    factory: Factory) -> None:
    """The pinned pynetdicom is the one node.receive.reactor was written for, so the SCP uses it;
    many C-STOREs on one association all land."""
    assert check_supported()
    port, _storage = scp
    source = pydicom.dcmread(sorted(CHEST_CT.glob("*.dcm"))[0])
    ae = AE(ae_title="LOOPS")
    ae.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    try:
        assert any(isinstance(t, EventDrivenAssociation) for t in threading.enumerate())
        for i in range(30):
            source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = \
                f"1.2.826.0.1.3680043.8.498.77.{i + 1}"
            status = assoc.send_c_store(source)
            assert status.Status == 0x0000
    finally:
        assoc.release()
    wait_until(lambda: count(factory) == 30, 20, what="30 rows")


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC210])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.826.0.1.3680043.8.498.12345"])
def test_store_response_is_what_pynetdicom_encodes(status: int, sop_instance: str) -> None:
    rsp = C_STORE()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = list(message.encode_msg(1, 16384))
    assert pdata.presentation_data_value_list == [
        (1, b"\x03" + store_response_command(rsp.AffectedSOPClassUID, sop_instance, 7, status))]


def test_fast_path_off_runs_pynetdicoms_own_loops(tmp_path: Path, factory: Factory) -> None:
    """``dicom.fast_path = false``: no event-driven association; instances still land."""
    with serve(tmp_path, factory, fast_path=False) as (port, _storage):
        source = pydicom.dcmread(sorted(CHEST_CT.glob("*.dcm"))[0])
        ae = AE(ae_title="STOCK")
        ae.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_established
        try:
            assert not any(isinstance(t, EventDrivenAssociation) for t in threading.enumerate())
            assert assoc.send_c_store(source).Status == 0x0000
        finally:
            assoc.release()
        assert count(factory) == 1
