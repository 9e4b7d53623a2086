"""The DICOM receiver: C-ECHO and C-STORE.

The C-STORE handler only stores: the encoded dataset as received (pixel data
never decoded) with a file meta header goes to a temp file, is fsync'd and
renamed into place, its row is committed, and only then is success returned.
Everything else happens later, off the association.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pydicom.config
import pydicom.uid as uid
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom import __version__ as pynetdicom_version
from pynetdicom.transport import ThreadedAssociationServer

from db.queue import InstanceMeta, SessionFactory, instance_known, record_instance
from node.errors import InvalidInstance, StorageError
from node.receive.reactor import EventDrivenHandler, check_supported
from node.runtime.clock import utcnow
from node.runtime.faults import crash_point
from node.runtime.metrics import ASSOCIATIONS
from node.settings import DicomSettings, Settings, StorageSettings
from node.store.files import StorageFull, check_uid, durable_write, ensure_free_space, instance_path
from node.store.ingest import Ingest
from node.tls import server_context

log = logging.getLogger("ainode.scp")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

VERIFICATION = "1.2.840.10008.1.1"
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0x0110

STORAGE_SOP_CLASSES: tuple[str, ...] = (
    uid.ComputedRadiographyImageStorage,
    uid.DigitalXRayImageStorageForPresentation,
    uid.DigitalXRayImageStorageForProcessing,
    uid.CTImageStorage,
    uid.EnhancedCTImageStorage,
    uid.LegacyConvertedEnhancedCTImageStorage,
    uid.MRImageStorage,
    uid.EnhancedMRImageStorage,
    uid.LegacyConvertedEnhancedMRImageStorage,
    uid.SecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
)

TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


@dataclass(frozen=True)
class StoreContext:
    """Everything the C-STORE handler needs, passed in."""

    storage: StorageSettings
    factory: SessionFactory
    clock: Callable[[], datetime]
    ingest: Ingest | None = None
    max_instance_bytes: int = 2048 * 1024 * 1024
    """The journal-first durable path; without it each instance is written and committed inline."""


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


def received_dataset(event: Any) -> Dataset:
    """The received data set's attributes, its large values (pixel data) left unread.

    The node stores the bytes as received and only needs a dozen attributes and
    the pixel data's length; decoding the pixel data too was a copy of the whole
    instance. Deflated data sets are inflated by pynetdicom as usual.
    """
    syntax = uid.UID(str(event.context.transfer_syntax))
    if syntax == DeflatedExplicitVRLittleEndian:
        return event.dataset  # type: ignore[no-any-return]
    stream = event.request.DataSet
    stream.seek(0)
    return read_dataset(stream, syntax.is_implicit_VR, syntax.is_little_endian,
                        defer_size=DEFER_BYTES)


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
            raise InvalidInstance("SOP Class UID differs from the request's")
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


def part10(event: Any) -> list[memoryview | bytes]:
    """The instance as a DICOM file: preamble, file meta and the data set exactly as received.

    What ``event.encoded_dataset()`` returns, as two pieces instead of one joined copy:
    the received data set is handed on as a view of pynetdicom's buffer.
    """
    req = event.request
    head = file_meta_header(str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID),
                            str(event.context.transfer_syntax))
    return [head, req.DataSet.getbuffer()]


def handle_store(event: Any, ctx: StoreContext) -> int:
    """C-STORE: store durably, record, then answer. Returns a DIMSE status."""
    assoc = event.assoc
    calling = str(assoc.requestor.ae_title).strip()
    req = event.request
    try:
        ensure_free_space(ctx.storage.dir, ctx.storage.min_free_mb)
        try:
            ds = received_dataset(event)
        except Exception as exc:
            raise InvalidInstance(f"cannot decode dataset: {type(exc).__name__}") from exc
        crash_point("scp.received")
        meta = read_meta(ds, str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID))
        parts = part10(event)  # [file meta header, the data set as received]
        check_pixel_data(ds, str(event.context.transfer_syntax), len(parts[1]))
        if ctx.ingest is None and instance_known(ctx.factory, meta.sop_uid):
            log.info("duplicate instance sop=%s from %s: already stored", meta.sop_uid, calling)
            return STATUS_SUCCESS
        rel = instance_path(meta.study_uid, meta.series_uid, meta.sop_uid)
        size = sum(len(p) for p in parts)
        if size > ctx.max_instance_bytes:
            raise StorageError(f"instance of {size} bytes exceeds dicom.max_instance_mb")
        meta = replace(meta, transfer_syntax=str(event.context.transfer_syntax), path=str(rel),
                       size=size, calling_ae=calling)
        if ctx.ingest is not None:
            new = ctx.ingest.store(meta, parts)  # durable in the journal when it returns
        else:
            durable_write(ctx.storage.dir, rel, b"".join(parts))
            new = record_instance(ctx.factory, meta, ctx.clock())
        if not new:
            log.info("duplicate instance sop=%s from %s: already stored", meta.sop_uid, calling)
        crash_point("scp.durable")
        return STATUS_SUCCESS
    except StorageFull as exc:
        log.error("store refused sop=%s from %s: out of resources: %s",
                  req.AffectedSOPInstanceUID, calling, exc)
        return STATUS_OUT_OF_RESOURCES
    except StorageError as exc:
        log.error("store failed sop=%s from %s: %s", req.AffectedSOPInstanceUID, calling, exc)
        return STATUS_OUT_OF_RESOURCES
    except InvalidInstance as exc:
        status = (STATUS_SOP_CLASS_MISMATCH if "SOP Class UID differs" in str(exc)
                  else STATUS_CANNOT_UNDERSTAND)
        log.warning("store rejected sop=%s from %s: %s (status 0x%04X)",
                    req.AffectedSOPInstanceUID, calling, exc, status)
        return status
    except Exception as exc:  # the database or something unforeseen: never kill the association
        log.exception("store failed sop=%s from %s: %s", req.AffectedSOPInstanceUID, calling,
                      type(exc).__name__)
        return STATUS_OUT_OF_RESOURCES


def handle_echo(event: Any) -> int:
    return STATUS_SUCCESS


def count_association(event: Any, outcome: str) -> None:
    """Count an association's outcome, in the serve process when this is an acceptor process."""
    server = getattr(event.assoc, "_server", None)
    if isinstance(server, HandoffServer):
        server.report(OUTCOME_BYTES[outcome])
    else:
        ASSOCIATIONS.labels(outcome).inc()


def handle_rejected(event: Any) -> None:
    count_association(event, "rejected")
    assoc = event.assoc
    log.warning("association rejected from %s:%s calling AE %r", assoc.requestor.address,
                assoc.requestor.port, str(assoc.requestor.ae_title).strip())


def handle_requested(event: Any, ae_networks: dict[str, list[IPNetwork]]) -> None:
    """Reject (A-ASSOCIATE-RJ) a calling AE that may not come from its address.

    Done on the request, before negotiation: pynetdicom marks an association
    established only after EVT_ACCEPTED returns, so an abort from there could
    lose the race against the peer's first request, which was then served.
    """
    assoc = event.assoc
    r = assoc.requestor
    calling = str(r.primitive.calling_ae_title).strip()  # r.ae_title is set by negotiation
    allowed = ae_networks.get(calling)
    if allowed is None or any(ipaddress.ip_address(r.address) in n for n in allowed):
        return
    log.warning("association from %s:%s refused: calling AE %r is not allowed from there "
                "(dicom.ae_networks)", r.address, r.port, calling)
    assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE title
    evt.trigger(assoc, evt.EVT_REJECTED, {})  # as pynetdicom's own rejections do
    assoc.kill()


def handle_accepted(event: Any) -> None:
    r = event.assoc.requestor
    count_association(event, "accepted")
    log.info("association accepted from %s:%s calling AE %r", r.address, r.port,
             str(r.ae_title).strip())


def quiet_pynetdicom() -> None:
    """Keep identifiers (patient names and IDs) out of pynetdicom's own log lines.

    Also read values leniently: a malformed value in an element the node does not
    use must not turn a valid instance away (what is used is checked explicitly).
    """
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def make_ae(dicom: DicomSettings) -> AE:
    ae = AE(ae_title=dicom.ae_title)
    ae.maximum_pdu_size = dicom.max_pdu
    ae.maximum_associations = dicom.max_associations
    ae.network_timeout = dicom.network_timeout
    ae.require_called_aet = True
    if dicom.allowed_calling_ae_titles:
        ae.require_calling_aet = list(dicom.allowed_calling_ae_titles)
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


class _Server(ThreadedAssociationServer):
    """The association server, refusing connections from outside ``allowed_networks``."""

    allowed_networks: list[IPNetwork] = []

    def prepare_client(self, client: socket.socket) -> socket.socket:
        """Bound a connected socket's silence; wrap it for TLS (handshake in its own thread).

        pynetdicom does the handshake in the accept loop, without a timeout, so
        one client that connects and stays silent would block every other client.
        """
        client.settimeout(self.ae.network_timeout)  # bounds a silent client's handshake
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client

    def get_request(self) -> tuple[Any, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        return self.prepare_client(client), address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return address_allowed(self.allowed_networks, client_address)


def address_allowed(networks: list[IPNetwork], client_address: Any) -> bool:
    """Whether a connection's source may connect (``dicom.allowed_networks``); logs refusals."""
    if not networks:
        return True
    address = ipaddress.ip_address(client_address[0])
    if any(address in network for network in networks):
        return True
    ASSOCIATIONS.labels("rejected").inc()
    log.warning("connection refused from %s:%s: not in dicom.allowed_networks",
                client_address[0], client_address[1])
    return False


READY = b"r"
"""Sent once by an acceptor process to the serve process when it takes connections."""
ENDED = b"d"
"""Sent by an acceptor process to the serve process whenever one of its associations ends."""
OUTCOME_BYTES = {"accepted": b"a", "rejected": b"j"}
"""Sent by an acceptor process for each association outcome (the metrics live in serve)."""


class HandoffServer(_Server):
    """An association server fed connected sockets by another process (``dicom.acceptors``).

    It has no listening socket: its ``socket`` is a Unix channel on which the serve
    process sends each accepted connection (SCM_RIGHTS) with the peer's address.
    It answers on the same channel with one byte whenever an association ends, so
    the serve process knows how busy each acceptor is.
    """

    def __init__(self, *args: Any, channel: socket.socket, **kwargs: Any) -> None:
        self.channel = channel
        self.parent_gone = threading.Event()
        self._send_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the TCP socket socketserver made: not used
        self.socket = self.channel

    def server_activate(self) -> None:
        pass

    def get_request(self) -> tuple[Any, Any]:
        message, fds, _flags, _address = socket.recv_fds(self.channel, 4096, 1)
        if not fds:
            if not message:  # the serve process is gone: stop
                self.parent_gone.set()
            raise OSError("no connection in the message")
        client = socket.socket(fileno=fds[0])
        host, port = json.loads(message)
        return self.prepare_client(client), (str(host), int(port))

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return True  # checked by the serve process before the handoff

    def association_finished(self) -> None:
        self.report(ENDED)

    def report(self, what: bytes) -> None:
        """Tell the serve process (one byte: ENDED, or an association outcome)."""
        with self._send_lock, contextlib.suppress(OSError):
            self.channel.send(what)

    def server_close(self) -> None:
        self.channel.close()


def start_receiver(settings: Settings, factory: SessionFactory, journal: Path,
                   channel: socket.socket | None = None
                   ) -> tuple[Ingest, ThreadedAssociationServer]:
    """The journal-first ingest and the SCP in front of it, as serve and each acceptor run them."""
    ingest = Ingest(settings.storage.dir, journal, factory, utcnow)
    ingest.start()
    server = start_scp(settings.dicom, StoreContext(
        settings.storage, factory, utcnow, ingest, int(settings.dicom.max_instance_mb * 2**20)),
        channel=channel)
    return ingest, server


def start_scp(dicom: DicomSettings, ctx: StoreContext, channel: socket.socket | None = None
              ) -> ThreadedAssociationServer:
    """Start listening on ``dicom.host:dicom.port`` in background threads.

    With ``channel``, take connections handed over by the serve process instead
    (:class:`HandoffServer`, one of ``dicom.acceptors`` processes).
    """
    quiet_pynetdicom()
    ctx.storage.dir.mkdir(parents=True, exist_ok=True)
    ae = make_ae(dicom)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_REQUESTED, handle_requested, [{
            ae: [ipaddress.ip_network(str(n)) for n in nets]
            for ae, nets in dicom.ae_networks.items()}]),
        (evt.EVT_ACCEPTED, handle_accepted),
    ]
    ssl_context = server_context(dicom.tls) if dicom.tls.enabled else None
    extra: dict[str, Any] = {}
    server_class: type[_Server] = _Server
    if channel is not None:
        server_class, extra["channel"] = HandoffServer, channel
    if check_supported():
        extra["request_handler"] = EventDrivenHandler
    else:
        log.warning("pynetdicom %s is not the version node.receive.reactor was written for: "
                    "using its stock (polling) association loops", pynetdicom_version)
    server = ae.make_server((dicom.host, dicom.port), evt_handlers=handlers,
                            ssl_context=ssl_context, server_class=server_class, **extra)
    assert isinstance(server, _Server)
    server.allowed_networks = [ipaddress.ip_network(str(n)) for n in dicom.allowed_networks]
    ae._servers.append(server)  # as AE.start_server does: its shutdown() removes it
    threading.Thread(target=server.serve_forever, name="scp-acceptor", daemon=True).start()
    log.info("SCP %s %s on %s:%d%s", dicom.ae_title,
             "listening" if channel is None else "taking connections", dicom.host, dicom.port,
             " (TLS)" if ssl_context else "")
    return server
