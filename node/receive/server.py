"""The association server in front of the C-STORE handler, and how a receiver is started.

:func:`start_receiver` is the one way the node receives, in ``serve`` and in
each acceptor process, and in the tests: the journal-first ingest, then the
server whose C-STORE handler stores through it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom.uid as uid
from pynetdicom import AE, evt
from pynetdicom import __version__ as pynetdicom_version
from pynetdicom.transport import ThreadedAssociationServer

from db.queue import SessionFactory
from node.dimse import VERIFICATION
from node.receive.reactor import (
    EventDrivenHandler,
    ReadLimits,
    check_supported,
    quiet_pynetdicom,
    register_server,
)
from node.receive.scp import (
    StoreContext,
    handle_accepted,
    handle_echo,
    handle_rejected,
    handle_requested,
    handle_store,
)
from node.runtime.clock import utcnow
from node.runtime.metrics import ASSOCIATIONS
from node.settings import DicomSettings, Settings
from node.store.ingest import Ingest
from node.tls import server_context

log = logging.getLogger("ainode.scp")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PeerAddress = tuple[str, int] | tuple[str, int, int, int]
"""A connection's source: (host, port), and an IPv6 one's flow info and scope id."""

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
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
)


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


def address_allowed(networks: list[IPNetwork], client_address: PeerAddress) -> bool:
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


class ReceiverServer(ThreadedAssociationServer):
    """The association server, refusing connections from outside ``allowed_networks``
    and beyond ``per_address`` open connections from one source address."""

    allowed_networks: list[IPNetwork] = []
    read_limits: ReadLimits = ReadLimits()
    per_address: int = 16

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: Counter[str] = Counter()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def admit(self, client_address: PeerAddress) -> bool:
        """Count a connection from ``client_address``; False (logged) when it has too many."""
        if self.RequestHandlerClass is not EventDrivenHandler:
            return True  # only the fast path reports when an association ends
        host = str(client_address[0])
        with self._open_lock:
            if self._open[host] >= self.per_address:
                ASSOCIATIONS.labels("rejected").inc()
                log.warning("connection refused from %s:%s: %d already open from there "
                            "(dicom.max_associations_per_address)", host, client_address[1],
                            self._open[host])
                return False
            self._open[host] += 1
            return True

    def association_ended(self, client_address: PeerAddress) -> None:
        """An association's thread ended, however it ended: its connection no longer counts.

        Called by the fast path (:class:`node.receive.reactor.EventDrivenHandler`); with
        ``dicom.fast_path = false`` connections per address are not limited.
        """
        host = str(client_address[0])
        with self._open_lock:
            self._open[host] -= 1
            if self._open[host] <= 0:
                del self._open[host]

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

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:  # pynetdicom's annotation
        assert self.socket is not None
        client, address = self.socket.accept()
        return self.prepare_client(client), address

    def verify_request(self, request: socket.socket | tuple[bytes, socket.socket],
                       client_address: PeerAddress) -> bool:
        return (address_allowed(self.allowed_networks, client_address)
                and self.admit(client_address))

    def report_outcome(self, outcome: str) -> None:
        """Count an association's outcome (``accepted`` or ``rejected``) in this process."""
        ASSOCIATIONS.labels(outcome).inc()


def start_receiver(settings: Settings, factory: SessionFactory, journal: Path,
                   server_class: type[ReceiverServer] = ReceiverServer, **server_args: Any
                   ) -> tuple[Ingest, ReceiverServer]:
    """The journal-first ingest and the SCP in front of it, as serve and each acceptor run them.

    ``server_class`` and ``server_args``: another server, e.g. an acceptor process's
    :class:`node.receive.handoff.HandoffServer` with its ``channel``.
    """
    ingest = Ingest(settings.storage.dir, journal, factory, utcnow)
    ingest.start()
    context = StoreContext(settings.storage, ingest, int(settings.dicom.max_instance_mb * 2**20))
    try:
        server = start_scp(settings.dicom, context, server_class, **server_args)
    except BaseException:
        ingest.stop()
        raise
    return ingest, server


def start_scp(dicom: DicomSettings, ctx: StoreContext,
              server_class: type[ReceiverServer] = ReceiverServer, **server_args: Any
              ) -> ReceiverServer:
    """Start listening on ``dicom.host:dicom.port`` in background threads."""
    quiet_pynetdicom()
    ctx.storage.dir.mkdir(parents=True, exist_ok=True)
    ae = make_ae(dicom)
    handlers: list[evt.EventHandlerType] = [
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_REQUESTED, handle_requested, [{
            ae: [ipaddress.ip_network(str(n)) for n in nets]
            for ae, nets in dicom.ae_networks.items()}]),
        (evt.EVT_ACCEPTED, handle_accepted),
    ]
    ssl_context = server_context(dicom.tls) if dicom.tls.enabled else None
    if not dicom.fast_path:
        log.info("dicom.fast_path is off: pynetdicom's stock (polling) association loops")
    elif check_supported():
        server_args["request_handler"] = EventDrivenHandler
    else:
        log.warning("pynetdicom %s is not the version node.receive.reactor was written for: "
                    "using its stock (polling) association loops", pynetdicom_version)
    server = ae.make_server((dicom.host, dicom.port), evt_handlers=handlers,
                            ssl_context=ssl_context, server_class=server_class, **server_args)
    assert isinstance(server, ReceiverServer)
    server.allowed_networks = [ipaddress.ip_network(str(n)) for n in dicom.allowed_networks]
    server.per_address = dicom.max_associations_per_address
    server.read_limits = ReadLimits(
        max_pdu=dicom.max_pdu, max_instance=ctx.max_instance_bytes,
        request_timeout=dicom.association_request_timeout,
        network_timeout=dicom.network_timeout)
    register_server(ae, server)
    threading.Thread(target=server.serve_forever, name="scp-acceptor", daemon=True).start()
    log.info("SCP %s %s on %s:%d%s", dicom.ae_title,
             "listening" if server_class is ReceiverServer else "taking connections",
             dicom.host, dicom.port, " (TLS)" if ssl_context else "")
    return server


def fast_path(dicom: DicomSettings) -> bool:
    """Whether the event-driven loops run (``dicom.fast_path`` and a supported pynetdicom)."""
    return dicom.fast_path and check_supported()
