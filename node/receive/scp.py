"""The C-STORE and C-ECHO handlers and the checks a received instance must pass.

The C-STORE handler only stores: the data set exactly as received (pixel data
never decoded) with its file meta header goes to the ingest journal, and success
is answered once the journal has flushed it (:class:`node.store.ingest.Ingest`).
Files, rows and everything else follow off the association. A refused instance
gets the DIMSE status of its error's type (:func:`status_for`).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import struct
import zlib
from dataclasses import dataclass, replace
from enum import IntEnum
from io import BytesIO
from typing import Protocol, cast

import pydicom.uid as uid
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.status import Status

from db.queue import InstanceMeta
from node.errors import (
    InstanceTooLarge,
    InvalidInstance,
    NodeError,
    SOPClassMismatch,
    StorageError,
)
from node.receive.reactor import association_server
from node.runtime.faults import crash_point
from node.settings import StorageSettings
from node.store.files import check_uid, ensure_free_space, instance_path
from node.store.ingest import Ingest

log = logging.getLogger("ainode.scp")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class StoreStatus(IntEnum):
    """The C-STORE statuses the node answers (PS3.4 B.2.3; names as in pynetdicom's table)."""

    SUCCESS = Status.SUCCESS
    OUT_OF_RESOURCES = 0xA700
    """Refused: Out of Resources."""
    SOP_CLASS_MISMATCH = 0xA900
    """Error: Data Set Does Not Match SOP Class."""
    CANNOT_UNDERSTAND = 0xC210
    """Error: Cannot Understand."""


ERROR_STATUS: dict[type[NodeError], StoreStatus] = {
    SOPClassMismatch: StoreStatus.SOP_CLASS_MISMATCH,
    InvalidInstance: StoreStatus.CANNOT_UNDERSTAND,
    StorageError: StoreStatus.OUT_OF_RESOURCES,
}


def status_for(exc: BaseException) -> StoreStatus:
    """The DIMSE status for a refused instance: that of its error's nearest type in the tree."""
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return StoreStatus.OUT_OF_RESOURCES  # the database or something unforeseen


@dataclass(frozen=True)
class StoreContext:
    """Everything the C-STORE handler needs, passed in."""

    storage: StorageSettings
    ingest: Ingest
    """The journal-first durable path: an instance is durable when ``ingest.store`` returns."""
    max_instance_bytes: int = 2048 * 1024 * 1024


CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
INT32_MAX = 2**31 - 1
MAX_PIXEL_BYTES = 2**33
"""Larger declared pixel data (8 GiB) is refused as absurd before anything is written."""


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    """A value as text fit for the database: no NULs or control characters, at most ``limit``."""
    try:
        value = ds.get(keyword, "")
        return CONTROL_CHARS.sub("", str(value or "")).strip()[:limit]
    except Exception:  # undecodable text (bad character set, bad VR): informational only
        return ""


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        number = None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None
    return number if number is None or abs(number) <= INT32_MAX else None


DEFER_BYTES = 64 * 1024
"""Values at least this long (pixel data) are not read when the data set is decoded."""


def store_request(event: Event) -> C_STORE:
    """An EVT_C_STORE event's request (pynetdicom types ``event.request`` as any DIMSE request)."""
    return cast(C_STORE, event.request)


def received_bytes(req: C_STORE) -> BytesIO:
    """The received data set's bytes, as pynetdicom holds them (set on every C-STORE request)."""
    if req.DataSet is None:
        raise InvalidInstance("C-STORE request without a data set")
    return req.DataSet


def inflate(data: memoryview | bytes, max_bytes: int) -> bytes:
    """A deflated data set's bytes, refused once they would pass ``max_bytes`` (a deflate bomb).

    The limit holds before memory is committed: at most ``max_bytes + 1`` bytes are
    ever produced.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = inflater.decompress(data, max_bytes + 1)
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise InstanceTooLarge(f"deflated data set inflates beyond {max_bytes} bytes "
                               "(dicom.max_instance_mb)")
    return out


def received_dataset(event: Event, max_bytes: int) -> tuple[Dataset, int]:
    """The received data set's attributes, its large values (pixel data) left unread.

    The node stores the bytes as received and only needs a dozen attributes and
    the pixel data's length; decoding the pixel data too was a copy of the whole
    instance. A deflated data set is inflated within ``max_bytes``. A data set that
    holds File Meta Information elements (group 0002) is refused: stored as
    received, they would reinterpret the file (a Transfer Syntax UID among them
    overrides the node's own when the file is read). Also returns the length of the
    decoded bytes (inflated, when deflated), which bounds what the values can hold.
    """
    syntax = uid.UID(str(event.context.transfer_syntax))
    stream = received_bytes(store_request(event))
    if syntax == DeflatedExplicitVRLittleEndian:
        stream = BytesIO(inflate(stream.getbuffer(), max_bytes))
    stream.seek(0)
    try:
        ds = read_dataset(stream, syntax.is_implicit_VR, syntax.is_little_endian,
                          defer_size=DEFER_BYTES)
    except Exception as exc:
        raise InvalidInstance(f"cannot decode dataset: {type(exc).__name__}") from exc
    first = min(ds.keys(), default=None)  # tags only: no deferred value is read
    if first is not None and first.group <= 0x0002:
        raise InvalidInstance("the data set holds command or File Meta Information elements "
                              "(group 0000 or 0002)")
    return ds, len(stream.getbuffer())


def check_pixel_data(ds: Dataset, transfer_syntax: str, encoded_length: int | None = None
                     ) -> None:
    """Refuse an image whose pixel data is missing, absurd or shorter than its header declares.

    Cheap: only lengths are compared, nothing is decoded. Encapsulated (compressed)
    pixel data cannot be sized without decoding; it only has to be present.
    """
    try:
        if "PixelData" not in ds:
            raise InvalidInstance("image without Pixel Data")
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
    except InvalidInstance:
        raise
    except Exception as exc:
        raise InvalidInstance(f"cannot decode image attributes: {type(exc).__name__}") from exc
    if min(rows, columns, samples, frames) < 1 or bits not in (1, 8, 16, 32, 64):
        raise InvalidInstance(f"absurd image size {rows}x{columns}x{frames}, "
                              f"{samples} sample(s) of {bits} bits")
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if expected > MAX_PIXEL_BYTES:
        raise InvalidInstance(f"absurd image size {rows}x{columns}x{frames} ({expected} bytes)")
    if uid.UID(transfer_syntax).is_compressed:
        return
    try:
        element = ds.get_item("PixelData", keep_deferred=True)
        if isinstance(element, RawDataElement) and element.value is None \
                and encoded_length is not None:
            # left unread (received_dataset): declared length, but no more than was sent
            length = min(int(element.length), encoded_length - int(element.value_tell))
        else:
            length = len(ds.PixelData or b"")
    except Exception as exc:
        raise InvalidInstance(f"cannot read Pixel Data: {type(exc).__name__}") from exc
    if length < expected:
        raise InvalidInstance(f"pixel data is {length} bytes, {rows}x{columns}x{frames} "
                              f"needs {expected}")


def read_meta(ds: Dataset, affected_sop_class: str, affected_sop_instance: str) -> InstanceMeta:
    """Extract and check what the database needs; raise :class:`InvalidInstance` when unusable."""
    try:
        sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
        sop_class = check_uid(ds.get("SOPClassUID"), "SOP Class UID")
        study_uid = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
        series_uid = check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
        if sop_uid != affected_sop_instance:
            raise InvalidInstance("SOP Instance UID differs from the request's")
        if sop_class != affected_sop_class:
            raise SOPClassMismatch("SOP Class UID differs from the request's")
        return InstanceMeta(
            study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, sop_class_uid=sop_class,
            transfer_syntax="", path="", size=0, calling_ae="",
            modality=_text(ds, "Modality", 16), body_part=_text(ds, "BodyPartExamined", 64),
            series_description=_text(ds, "SeriesDescription", 64),
            series_number=_int_or_none(ds, "SeriesNumber"),
            accession_number=_text(ds, "AccessionNumber", 16) or None,
        )
    except InvalidInstance:
        raise
    except Exception as exc:  # pydicom raises many types on malformed elements
        raise InvalidInstance(f"cannot decode dataset: {type(exc).__name__}") from exc


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a 2-byte length (UL, UI, SH)."""
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group, as pynetdicom encodes them.

    The same bytes as ``encode_file_meta(event.file_meta)`` (a test compares them),
    built directly: pydicom's general writer took a quarter of a millisecond per
    instance on the receive path.
    """
    body = (struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
            + _element(0x0002, 0x0002, b"UI", _even(sop_class, b"\x00"))
            + _element(0x0002, 0x0003, b"UI", _even(sop_instance, b"\x00"))
            + _element(0x0002, 0x0010, b"UI", _even(transfer_syntax, b"\x00"))
            + _element(0x0002, 0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\x00"))
            + _element(0x0002, 0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")))
    length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + length + body


def part10(event: Event) -> list[memoryview | bytes]:
    """The instance as a DICOM file: preamble, file meta and the data set exactly as received.

    What ``event.encoded_dataset()`` returns, as two pieces instead of one joined copy:
    the received data set is handed on as a view of pynetdicom's buffer.
    """
    req = store_request(event)
    head = file_meta_header(str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID),
                            str(event.context.transfer_syntax))
    return [head, received_bytes(req).getbuffer()]


def handle_store(event: Event, ctx: StoreContext) -> int:
    """C-STORE: make the instance durable, then answer. Returns a DIMSE status."""
    calling = str(event.assoc.requestor.ae_title).strip()
    req = store_request(event)
    try:
        ensure_free_space(ctx.storage.dir, ctx.storage.min_free_mb)
        ds, decoded_length = received_dataset(event, ctx.max_instance_bytes)
        crash_point("scp.received")
        meta = read_meta(ds, str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID))
        parts = part10(event)  # [file meta header, the data set as received]
        check_pixel_data(ds, str(event.context.transfer_syntax), decoded_length)
        size = sum(len(p) for p in parts)
        if size > ctx.max_instance_bytes:
            raise InstanceTooLarge(f"instance of {size} bytes exceeds dicom.max_instance_mb")
        rel = instance_path(meta.study_uid, meta.series_uid, meta.sop_uid)
        meta = replace(meta, transfer_syntax=str(event.context.transfer_syntax), path=str(rel),
                       size=size, calling_ae=calling)
        if not ctx.ingest.store(meta, parts):  # durable in the journal when it returns
            log.info("duplicate instance sop=%s from %s: already stored", meta.sop_uid, calling)
        crash_point("scp.durable")
        return StoreStatus.SUCCESS
    except InvalidInstance as exc:
        status = status_for(exc)
        log.warning("store rejected sop=%s from %s: %s (status 0x%04X)",
                    req.AffectedSOPInstanceUID, calling, exc, status)
        return status
    except StorageError as exc:
        log.error("store refused sop=%s from %s: out of resources: %s",
                  req.AffectedSOPInstanceUID, calling, exc)
        return status_for(exc)
    except Exception as exc:  # the database or something unforeseen: never kill the association
        log.exception("store failed sop=%s from %s: %s", req.AffectedSOPInstanceUID, calling,
                      type(exc).__name__)
        return status_for(exc)


def handle_echo(event: Event) -> int:
    return StoreStatus.SUCCESS


class OutcomeReporter(Protocol):
    """What the node's association servers add (:class:`node.receive.server.ReceiverServer`)."""

    def report_outcome(self, outcome: str) -> None: ...


def count_association(event: Event, outcome: str) -> None:
    """Count an association's outcome where the metrics live (see ``report_outcome``)."""
    # an acceptor association's server: one start_scp made, a ReceiverServer (or subclass)
    cast(OutcomeReporter, association_server(event.assoc)).report_outcome(outcome)


def handle_rejected(event: Event) -> None:
    count_association(event, "rejected")
    assoc = event.assoc
    log.warning("association rejected from %s:%s calling AE %r", assoc.requestor.address,
                assoc.requestor.port, str(assoc.requestor.ae_title).strip())


def handle_requested(event: Event, ae_networks: dict[str, list[IPNetwork]]) -> None:
    """Reject (A-ASSOCIATE-RJ) a calling AE that may not come from its address.

    Done on the request, before negotiation: pynetdicom marks an association
    established only after EVT_ACCEPTED returns, so an abort from there could
    lose the race against the peer's first request, which was then served.
    """
    assoc = event.assoc
    r = assoc.requestor
    request = cast(A_ASSOCIATE, r.primitive)  # the A-ASSOCIATE-RQ: set before EVT_REQUESTED
    calling = str(request.calling_ae_title).strip()  # r.ae_title is set by negotiation
    allowed = ae_networks.get(calling)
    if allowed is None or any(ipaddress.ip_address(r.address) in n for n in allowed):
        return
    log.warning("association from %s:%s refused: calling AE %r is not allowed from there "
                "(dicom.ae_networks)", r.address, r.port, calling)
    assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE title
    evt.trigger(assoc, evt.EVT_REJECTED, {})  # as pynetdicom's own rejections do
    assoc.kill()


def handle_accepted(event: Event) -> None:
    r = event.assoc.requestor
    count_association(event, "accepted")
    log.info("association accepted from %s:%s calling AE %r", r.address, r.port,
             str(r.ae_title).strip())


