"""Hostile input against the receiver: mutations of the real sample files, sent with
pynetdicom (raw bytes, as crafted) to an in-process SCP on a real SQLite file.

Every case must get a DIMSE status (or a refused presentation context), never an
internal failure (0xA700 is reserved for disk/database trouble); the SCP keeps
answering on the same association; valid instances sent before and after each case
are stored; nothing is written outside the storage folder.
"""

from __future__ import annotations

import random
import re
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from sqlalchemy import select

from db.schema import Instance
from node.receive.reactor import quiet_pynetdicom
from node.receive.scp import StoreStatus
from node.settings import DicomSettings
from tests.conftest import Factory
from tests.peers import CHEST_CT, SAMPLES, echoscu, free_port, storescu, wait_until
from tests.receiver import running_receiver

CT = sorted(CHEST_CT.glob("*.dcm"))[0]
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
UID_PATH = re.compile(r"^instances/[0-9.]+/[0-9.]+/[0-9.]+\.dcm$"
                      r"|^journal/test/[0-9]+-[0-9a-f]+\.journal$")  # the node's own journal
CANNOT_UNDERSTAND, SOP_CLASS_MISMATCH, SUCCESS = (
    StoreStatus.CANNOT_UNDERSTAND, StoreStatus.SOP_CLASS_MISMATCH, StoreStatus.SUCCESS)
ANY = None  # the case may be accepted or refused, but must get a proper status


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], Path]
    expected: int | None


def ct() -> Dataset:
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def saved(ds: Dataset, path: Path, *, implicit: bool = False) -> Path:
    ds.save_as(path, enforce_file_format=not implicit)
    return path


def edit(change: Callable[[Dataset], None], **meta: str) -> Callable[[Path], Path]:
    """A case made by changing the decoded dataset. The file meta (which the sender
    turns into the request's affected SOP class and instance) keeps the original CT
    class and instance UID, or takes ``meta``; it is not derived from the dataset."""
    def make(path: Path) -> Path:
        ds = ct()
        original = Dataset()
        original.update(ds.file_meta)
        change(ds)
        ds.file_meta = pydicom.dataset.FileMetaDataset(original)
        for keyword, value in meta.items():
            setattr(ds.file_meta, keyword, value)
        ds.save_as(path, enforce_file_format=False)
        return path
    return make


def raw(change: Callable[[bytearray, int], None]) -> Callable[[Path], Path]:
    """A case made by changing the bytes of a valid file after its file meta (offset given)."""
    def make(path: Path) -> Path:
        ds = ct()
        saved(ds, path)
        data = bytearray(path.read_bytes())
        meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
        change(data, meta_end)
        path.write_bytes(bytes(data))
        return path
    return make


def _delete(keyword: str) -> Callable[[Dataset], None]:
    return lambda ds: delattr(ds, keyword)


def _set(**values: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return change


def _short_pixels(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _patch_vr(tag: bytes, vr: bytes) -> Callable[[bytearray, int], None]:
    def change(data: bytearray, start: int) -> None:
        at = data.index(tag, start)
        data[at + 4:at + 6] = vr
    return change


def _truncate(fraction: float) -> Callable[[bytearray, int], None]:
    def change(data: bytearray, start: int) -> None:
        del data[start + int((len(data) - start) * fraction):]
    return change


def _insert_file_meta(syntax: str) -> Callable[[bytearray, int], None]:
    """A (0002,0010) Transfer Syntax UID element inside the data set itself.

    Placed after the data set's first element (a short-VR one), so that readers of
    the crafted file (the sender) take it as data set, not as its file meta.
    """
    value = syntax.encode() + (b"\x00" if len(syntax) % 2 else b"")

    def change(data: bytearray, start: int) -> None:
        first_end = start + 8 + int.from_bytes(data[start + 6:start + 8], "little")
        data[first_end:first_end] = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI",
                                                len(value)) + value
    return change


def _flip(seed: int) -> Callable[[bytearray, int], None]:
    def change(data: bytearray, start: int) -> None:
        rng = random.Random(seed)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(start, start + 1500)  # in the header, before the pixels
            data[at] = rng.randrange(256)
    return change


def _sample(rel: str) -> Callable[[Path], Path]:
    return lambda _path: SAMPLES / rel


def _non_ascii(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesDescription = "Thorax \u00fcber \u4e2d\u6587 \u0645\u0631\u062d\u0628\u0627"
    ds.PatientName = "M\u00fcller^J\u00fcrgen"


CASES = [
    Case("missing-sop-instance-uid", edit(_delete("SOPInstanceUID")), CANNOT_UNDERSTAND),
    Case("missing-study-uid", edit(_delete("StudyInstanceUID")), CANNOT_UNDERSTAND),
    Case("missing-series-uid", edit(_delete("SeriesInstanceUID")), CANNOT_UNDERSTAND),
    Case("missing-sop-class-uid", edit(_delete("SOPClassUID")), CANNOT_UNDERSTAND),
    Case("sop-class-contradicts-context", edit(_set(SOPClassUID=MR_IMAGE)),
         SOP_CLASS_MISMATCH),
    Case("non-image-class-in-image-context", edit(_set(SOPClassUID=RT_PLAN)),
         SOP_CLASS_MISMATCH),
    Case("non-image-class-proposed", edit(_set(SOPClassUID=RT_PLAN),
                                          MediaStorageSOPClassUID=RT_PLAN), ANY),
    Case("instance-uid-differs-from-request", edit(_set(SOPInstanceUID="1.2.3")),
         CANNOT_UNDERSTAND),
    Case("series-uid-escapes", edit(_set(SeriesInstanceUID="../../../../tmp/evil")),
         CANNOT_UNDERSTAND),
    Case("study-uid-escapes", edit(_set(StudyInstanceUID="1.2/../../../x")),
         CANNOT_UNDERSTAND),
    Case("sop-uid-escapes", edit(_set(SOPInstanceUID="../../../../etc/ainode-evil"),
                                 MediaStorageSOPInstanceUID="../../../../etc/ainode-evil"),
         CANNOT_UNDERSTAND),
    Case("sop-uid-escapes-meta-only", edit(_set(), MediaStorageSOPInstanceUID="../../x"),
         CANNOT_UNDERSTAND),
    Case("absolute-path-uid", edit(_set(StudyInstanceUID="/tmp/ainode-evil")),
         CANNOT_UNDERSTAND),
    Case("uid-too-long", edit(_set(SeriesInstanceUID="1." + "2" * 100)),
         CANNOT_UNDERSTAND),
    Case("absurd-rows-columns", edit(_set(Rows=65535, Columns=65535)), CANNOT_UNDERSTAND),
    Case("zero-rows", edit(_set(Rows=0)), CANNOT_UNDERSTAND),
    Case("absurd-frames", edit(_set(NumberOfFrames=10**9)), CANNOT_UNDERSTAND),
    Case("bad-bits-allocated", edit(_set(BitsAllocated=13)), CANNOT_UNDERSTAND),
    Case("pixel-data-short", edit(_short_pixels), CANNOT_UNDERSTAND),
    Case("pixel-data-missing", edit(_delete("PixelData")), CANNOT_UNDERSTAND),
    Case("very-long-values", edit(_set(SeriesDescription="X" * 20000, PatientName="P" * 60000,
                                       AccessionNumber="9" * 5000, SeriesNumber="9" * 11,
                                       Modality="CT" * 500)), SUCCESS),
    Case("non-ascii-values", edit(_non_ascii), SUCCESS),
    Case("nul-and-control-chars", edit(_set(SeriesDescription="a\x00b\x01c\x1b[31m",
                                            BodyPartExamined="\x00\x00")), SUCCESS),
    Case("wrong-vr-uid-as-us", raw(_patch_vr(b"\x20\x00\x0d\x00", b"US")), ANY),
    Case("wrong-vr-rows-as-sq", raw(_patch_vr(b"\x28\x00\x10\x00", b"SQ")), ANY),
    Case("wrong-vr-name-as-ob", raw(_patch_vr(b"\x10\x00\x10\x00", b"OB")), ANY),
    Case("unknown-vr", raw(_patch_vr(b"\x08\x00\x60\x00", b"ZZ")), ANY),
    Case("truncated-header", raw(_truncate(0.001)), CANNOT_UNDERSTAND),
    Case("truncated-in-pixels", raw(_truncate(0.6)), CANNOT_UNDERSTAND),
    Case("truncated-to-meta", raw(_truncate(0.0)), CANNOT_UNDERSTAND),
    # Stored as received, it would make every later read of the file inflate it.
    Case("file-meta-in-data-set", raw(_insert_file_meta(DeflatedExplicitVRLittleEndian)),
         CANNOT_UNDERSTAND),
    *(Case(f"random-header-bytes-{seed}", raw(_flip(seed)), ANY) for seed in range(40)),
    *(Case(f"sample-{name}", _sample(f"malformed/{name}.dcm"), ANY) for name in (
        "966_bad_J2K_COM_marker", "ELSCINT1_JP2vsJ2K", "JPEG2000-embedded-sequence-delimiter",
        "JPEGLossless_1s_1f_i_16_16_bad", "MR_truncated", "RG2_JPLY_bad_SOS",
        "SC_rgb_small_odd", "TOSHIBA_J2K_SIZ0_PixRep1", "bad_sequence", "explicit_VR-UN",
        "badVR", "rtplan_truncated", "reportsi_with_empty_number_tags")),
    Case("sample-MR_truncated-pixels", _sample("malformed/MR_truncated.dcm"),
         CANNOT_UNDERSTAND),
]


@pytest.fixture
def scp(tmp_path: Path, factory: Factory) -> Iterator[tuple[int, Path]]:
    port = free_port()
    root = tmp_path / "store"
    with running_receiver(root, factory, DicomSettings(host="127.0.0.1", port=port)):
        yield port, root


def associate(port: int, contexts: list[tuple[str, str]]) -> Association:
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in {*contexts, (str(pydicom.dcmread(CT).SOPClassUID),
                                          ExplicitVRLittleEndian)}:
        ae.add_requested_context(sop_class, syntax)
    return ae.associate("127.0.0.1", port, ae_title="AINODE")


def stored(factory: Factory) -> set[str]:
    with factory() as s:
        return set(s.scalars(select(Instance.sop_uid)))


def test_every_hostile_case_gets_a_status_and_valid_neighbours_are_stored(
        scp: tuple[int, Path], factory: Factory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_pynetdicom()
    # Send each file's bytes as crafted: pynetdicom must not decode and re-encode them.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    port, root = scp
    cases = tmp_path / "cases"
    cases.mkdir()
    outside_before = {p for p in tmp_path.rglob("*") if root not in p.parents and p != root}
    statuses: dict[str, str] = {}
    failures: list[str] = []
    for n, case in enumerate(CASES):
        path = case.make(cases / f"{n:03d}-{case.name}.dcm")
        try:
            meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
            context = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except Exception:
            statuses[case.name] = "unreadable by the sender"
            continue
        before, after = saved(ct(), cases / f"{n:03d}-a.dcm"), saved(ct(), cases / f"{n:03d}-b.dcm")
        assoc = associate(port, [context])
        assert assoc.is_established, f"{case.name}: association refused"
        try:
            assert assoc.send_c_store(before).Status == SUCCESS
            try:
                response = assoc.send_c_store(path)
            except ValueError as exc:  # no accepted presentation context: refused at negotiation
                statuses[case.name] = f"context refused ({exc.__class__.__name__})"
                response = None
            if response is not None:
                if "Status" not in response:
                    failures.append(f"{case.name}: no DIMSE status (association lost)")
                    continue
                code = int(response.Status)
                statuses[case.name] = f"0x{code:04X}"
                wanted = "any but 0xA700" if case.expected is None else hex(case.expected)
                if code == 0xA700 or (case.expected is not None and code != case.expected):
                    failures.append(f"{case.name}: status 0x{code:04X}, expected {wanted}")
            assert assoc.send_c_store(after).Status == SUCCESS
        finally:
            assoc.release()
        for valid in (before, after):
            sop = str(pydicom.dcmread(valid, stop_before_pixels=True).SOPInstanceUID)
            wait_until(lambda sop=sop: sop in stored(factory), 5,  # type: ignore[misc]
                       what=f"{case.name}: a valid neighbour stored")
    assert failures == [], "\n".join(failures)
    assert echoscu(port) == 0  # still answering
    # Nothing written outside the storage folder, and inside it only UID-named files.
    outside_after = {p for p in tmp_path.rglob("*") if root not in p.parents and p != root}
    database = {p for p in outside_after if p.name.startswith("ainode.db")}
    assert outside_after - database == (outside_before - database) | set(cases.rglob("*"))
    for path in root.rglob("*"):
        if path.is_file():
            assert UID_PATH.match(path.relative_to(root).as_posix()), path
    assert not Path("/tmp/evil").exists() and not Path("/etc/ainode-evil").exists()
    refused = sum(1 for s in statuses.values() if s != "0x0000")
    print(f"{len(CASES)} cases: {refused} refused, {len(statuses) - refused} stored; {statuses}")


def test_malformed_samples_with_storescu_get_statuses(scp: tuple[int, Path]) -> None:
    """dcmtk sends what it can read of malformed/; the node answers each and keeps running."""
    port, _ = scp
    files = sorted((SAMPLES / "malformed").glob("*.dcm"))
    out = storescu(port, files)
    # storescu skips what it cannot read or has no accepted context for (most of them).
    assert "Received Store Response" in out.stderr, out.stderr
    assert "OutOfResources" not in out.stderr
    assert echoscu(port) == 0
    assert storescu(port, CT).returncode == 0


def deflate_bomb(path: Path, inflated_mb: int) -> Path:
    """A CT whose deflated data set is small but inflates to ``inflated_mb`` MiB of pixels."""
    ds = ct()
    side = int((inflated_mb * 2**20 // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    del ds.PixelData
    head = pydicom.filebase.DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(head, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [deflater.compress(head.getvalue()),
            deflater.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, side * side * 2))]
    zeros = bytes(2**20)
    for _ in range(side * side * 2 // len(zeros)):
        body.append(deflater.compress(zeros))
    body.append(deflater.compress(bytes(side * side * 2 % len(zeros))))
    body.append(deflater.flush())
    meta = Dataset()
    meta.update(ds.file_meta)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(out, pydicom.dataset.FileMetaDataset(meta))
    path.write_bytes(b"\x00" * 128 + b"DICM" + out.getvalue() + b"".join(body))
    return path


def test_deflate_bomb_is_refused_before_it_inflates(tmp_path: Path, factory: Factory) -> None:
    """Inflated size counts against dicom.max_instance_mb, checked as it inflates."""
    quiet_pynetdicom()
    bomb = deflate_bomb(tmp_path / "bomb.dcm", 512)
    assert bomb.stat().st_size < 2 * 2**20  # under 2 MB on the wire
    port = free_port()
    with running_receiver(tmp_path / "store", factory, DicomSettings(host="127.0.0.1", port=port),
                          max_instance_mb=16):
        ae = AE(ae_title="BOMBER")
        ae.add_requested_context(str(pydicom.dcmread(CT).SOPClassUID),
                                 DeflatedExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_established
        tracemalloc.start()
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
                status = assoc.send_c_store(bomb)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            assoc.release()
        assert status.Status == 0xA700  # out of resources: larger than allowed
        assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a 512 MiB bomb"
        assert echoscu(port) == 0
    assert stored(factory) == set()
