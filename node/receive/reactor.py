"""Everything of the node that touches pynetdicom's internals, and nothing else.

The only module allowed to (``tests/unit/test_architecture.py`` checks it): the
event-driven loops below (the fast path, off with ``dicom.fast_path = false``),
pynetdicom's module-level logging switches (``pynetdicom._config``, its documented
way), registering a server with its AE, and finding an association's server.

Event-driven reactor loops for pynetdicom's acceptor associations.

pynetdicom polls. An association has two threads: the DUL thread sleeps 1 ms
whenever a pass found nothing to do, and the association thread sleeps 1 ms
before every look at its message queue. A C-STORE round trip waits through
both sleeps, about 2 ms of the 3 ms each instance took at 300 images/s.

Here both threads block on what they actually wait for:

* the DUL thread on ``select`` over the peer's socket and an eventfd that is
  signalled whenever something is queued for it (a primitive to send, a state
  machine event, a request to stop);
* the association thread on an event set whenever a DIMSE message or an
  ACSE primitive (release, abort) is queued for it.

Both still wake at least every ``IDLE_WAKE`` seconds to check timers, as
pynetdicom's loops do. The loop bodies are pynetdicom's own (3.0), unchanged
except for the wait; ``check_supported`` refuses any other pynetdicom so an
upgrade is a deliberate step (the stock loops are then used).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

import pydicom.config
import pynetdicom
from pynetdicom import AE, _config, evt
from pynetdicom.association import LOGGER as ASSOC_LOG
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE, DimsePrimitiveType
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import (
    AssociationServer,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

if TYPE_CHECKING:
    from pynetdicom.pdu import _PDUType

T = TypeVar("T")

log = logging.getLogger("ainode.scp")
SUPPORTED = ("3.0.",)
P_DATA_TF_TYPE = 0x04
P_DATA_TF_EVENT = "Evt10"
"""PS3.8 9.2 state machine event: P-DATA-TF PDU received."""
IDLE_WAKE = 0.01
READ_CHUNK = 4 * 2**20
"""A PDU's buffer starts at most this large and grows as its bytes arrive."""
CONTROL_PDU_MAX = 2**20
"""Largest PDU other than P-DATA-TF (an association request with many contexts is ~64 KiB)."""
PDU_SLACK = 2**20
"""With ``dicom.max_pdu = 0``, a P-DATA-TF PDU may exceed the largest instance by this much."""
"""Longest a thread sleeps without a signal (timers: ARTIM, network timeout)."""


def readable(fds: list[int], timeout: float) -> set[int]:
    """The descriptors among ``fds`` that are readable (or closed) within ``timeout`` s."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return {fd for fd, _ in poller.poll(timeout * 1000)}


def check_supported() -> bool:
    return pynetdicom.__version__.startswith(SUPPORTED)


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


def register_server(ae: AE, server: ThreadedAssociationServer) -> None:
    """Register a server made with ``AE.make_server`` as ``AE.start_server`` does.

    The server's ``shutdown()`` removes it from its AE again, so it must be there.
    """
    ae._servers.append(server)


def association_server(assoc: Association) -> AssociationServer | None:
    """The association server an acceptor association belongs to (None: a requestor's)."""
    return assoc._server


class _SignalQueue(queue.Queue[T]):
    """A queue that calls ``notify`` after every put; takes over what ``old`` holds."""

    def __init__(self, notify: Callable[[], None], old: queue.Queue[T]) -> None:
        super().__init__()
        self._notify = notify
        while not old.empty():
            super().put(old.get_nowait())

    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _Wakeup:
    """An eventfd a thread can ``select`` on; closed when garbage collected."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        weakref.finalize(self, os.close, self.fd)

    def signal(self) -> None:
        os.eventfd_write(self.fd, 1)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)


@dataclass(frozen=True)
class ReadLimits:
    """What a peer may send before anything is committed for it."""

    max_pdu: int = 0
    """Largest P-DATA-TF PDU (``dicom.max_pdu``); 0: ``max_instance`` plus some slack."""
    max_instance: int = 2048 * 2**20
    request_timeout: float = 10.0
    """Seconds from the connection to the whole association request (ARTIM, PS3.8 9.1.5)."""
    network_timeout: float = 60.0

    def for_pdu(self, pdu_type: int) -> int:
        if pdu_type == P_DATA_TF_TYPE:
            return self.max_pdu or self.max_instance + PDU_SLACK
        return CONTROL_PDU_MAX


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, waiting on its socket and an eventfd instead of sleeping."""

    _wakeup: _Wakeup
    limits: ReadLimits = ReadLimits()
    _dataset_bytes: int = 0
    """Bytes of the data set being assembled from P-DATA fragments so far."""
    _refused: bool = False
    """A PDU was refused: the association is being aborted."""

    def _install(self) -> None:
        self._wakeup = _Wakeup()
        self.event_queue = _SignalQueue(self._signal, self.event_queue)
        self.to_provider_queue = _SignalQueue(self._signal, self.to_provider_queue)

    def _signal(self) -> None:
        if threading.get_ident() != self.ident:  # its own puts are seen without a wake-up
            self._wakeup.signal()

    def run(self) -> None:  # the thread was built with the stock loop as its target
        self.run_reactor()

    def _read_pdu_data(self) -> None:
        """pynetdicom's PDU read, refusing a PDU longer than allowed before reading it.

        The length is checked against :attr:`limits` (``dicom.max_pdu`` for P-DATA,
        a small bound for the other PDUs) as soon as the 6-byte header is in: a
        peer that claims 4 GiB is aborted (Evt19) instead of being read. The first
        PDU (the association request) must arrive whole by the socket's deadline;
        after it, reads wait up to the network timeout again.
        """
        sock = cast(LargeReadSocket, self.socket)
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError):
            self._connection_lost()
            return
        if len(header) != 6:
            self._connection_lost()
            return
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        limit = self.limits.for_pdu(pdu_type)
        if pdu_length > limit:
            log.warning("PDU of type 0x%02X claims %d bytes, more than the %d allowed: "
                        "aborting the association", pdu_type, pdu_length, limit)
            self.event_queue.put("Evt19")  # invalid PDU: A-ABORT
            return
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError):
            self._connection_lost()
            return
        if len(body) != pdu_length:
            self._connection_lost()
            return
        if sock.deadline is not None:  # the association request is in: no total limit now
            sock.deadline = None
            cast(socket.socket, sock.socket).settimeout(self.limits.network_timeout)
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:
            if not self._refused:  # PDUs already on their way are refused without a word
                log.warning("refused a received PDU of type 0x%02X, aborting the "
                            "association: %s", pdu_type, exc)
            self._refused = True
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _connection_lost(self) -> None:
        """Evt17; before any request, also wake the association thread that waits for one."""
        self.event_queue.put("Evt17")
        sock = cast(LargeReadSocket, self.socket)
        if sock.deadline is not None:
            self.to_user_queue.put(None)  # type: ignore[arg-type]  # None: "no request"

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wakeup.signal()

    def stop_dul(self) -> bool:
        self._wakeup.signal()
        return super().stop_dul()

    def _decode_pdu(self, bytestream: bytearray) -> tuple[_PDUType, str]:
        """A P-DATA-TF PDU as views of the received bytes; anything else as pynetdicom does.

        pynetdicom copies a P-DATA-TF's payload four times while decoding it (to
        bytes, then slice by slice), all under the GIL; the data set bytes are
        copied once more anyway, into the message being assembled. A bound
        EVT_DATA_RECV or EVT_PDU_RECV handler gets pynetdicom's own path.
        """
        if (bytestream[0] != P_DATA_TF_TYPE or self.assoc.get_handlers(evt.EVT_DATA_RECV)
                or self.assoc.get_handlers(evt.EVT_PDU_RECV)):
            return super()._decode_pdu(bytestream)
        view = memoryview(bytestream)
        pdu = P_DATA_TF()
        offset, end = 6, len(bytestream)
        while offset < end:
            if offset + 5 > end:
                raise ValueError("truncated presentation data value item")
            (length,) = struct.unpack_from(">I", view, offset)
            if length < 1 or offset + 4 + length > end:
                raise ValueError("presentation data value item longer than its PDU")
            item = PresentationDataValueItem()
            item.presentation_context_id = view[offset + 4]
            item.presentation_data_value = view[offset + 5:offset + 4 + length]  # type: ignore[assignment]
            pdu.presentation_data_value_items.append(item)
            self._count_fragment(view[offset + 5], length - 2)
            offset += 4 + length
        return pdu, P_DATA_TF_EVENT

    def _count_fragment(self, header: int, length: int) -> None:
        """Bound the data set being assembled from fragments (PS3.8 E.2 message control
        header: bit 0 command, bit 1 last fragment): past ``max_instance`` plus slack the
        PDU is refused (the association is aborted) before pynetdicom gathers more."""
        if header & 0x01:  # a command fragment
            return
        self._dataset_bytes += length  # once past the limit it stays past: all refused
        if self._dataset_bytes > self.limits.max_instance + PDU_SLACK:
            raise ValueError(f"data set larger than {self.limits.max_instance} bytes "
                             "(dicom.max_instance_mb)")
        if header & 0x02:  # its last fragment
            self._dataset_bytes = 0

    def _wait(self) -> None:
        """Block until the socket is readable, something was queued, or ``IDLE_WAKE``."""
        sock = self.socket
        raw: socket.socket | None = sock.socket if sock is not None and sock._is_connected \
            else None
        if raw is None:
            time.sleep(self._run_loop_delay)
            return
        try:
            ready = readable([raw.fileno(), self._wakeup.fd], IDLE_WAKE)
        except (OSError, ValueError):  # closed under us: the loop body notices
            time.sleep(self._run_loop_delay)
            return
        if self._wakeup.fd in ready:
            self._wakeup.drain()

    def run_reactor(self) -> None:
        # pynetdicom 3.0 DULServiceProvider.run_reactor; only the idle sleep differs
        self._idle_timer.start()
        self.socket = cast("AssociationSocket", self.socket)
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                self._wait()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                log.error("Exception in the DUL reactor, aborting association")
                log.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            sleep = False


class EventDrivenAssociation(Association):
    """pynetdicom's acceptor reactor, waiting for a message instead of sleeping 1 ms."""

    _wakeup: threading.Event
    on_finished: Callable[[], None] | None = None
    """Called once when the association's thread ends, however it ends."""

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.on_finished is not None:
                self.on_finished()

    def _install(self) -> None:
        self._wakeup = threading.Event()
        self.dimse.msg_queue = _SignalQueue(self._wakeup.set, self.dimse.msg_queue)
        self.dul.to_user_queue = _SignalQueue(self._wakeup.set, self.dul.to_user_queue)

    def kill(self) -> None:
        super().kill()
        self._wakeup.set()

    def _wait(self) -> None:
        if self.dimse.msg_queue.empty() and self.dul.to_user_queue.empty():
            self._wakeup.wait(IDLE_WAKE)
        self._wakeup.clear()

    def _run_reactor(self) -> None:
        # pynetdicom 3.0 Association._run_reactor; only the 1 ms sleep differs
        self._is_paused = False
        while not self._kill:
            self._wait()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOC_LOG.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                ASSOC_LOG.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                ASSOC_LOG.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return


class LargeReadSocket(AssociationSocket):
    """pynetdicom's socket wrapper, reading a PDU in few calls, memory only as bytes arrive.

    The stock ``recv`` reads 4096 bytes per call and appends each piece: about
    130 calls and copies for one 512x512 CT slice. Here the bytes go into one
    buffer that starts at :data:`READ_CHUNK` at most and doubles as data actually
    arrives, so a peer that only *claims* a large PDU commits no memory. Until
    ``deadline`` (monotonic seconds) is cleared, every read must end by then: the
    association request has a total time limit, however slowly its bytes trickle.
    """

    deadline: float | None = None

    @property
    def ready(self) -> bool:
        """pynetdicom's ``ready`` with ``poll`` instead of ``select`` (which refuses file
        descriptors of 1024 and above, as a node with many open files has)."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        try:
            ready = bool(readable([sock.fileno()], 0))
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if isinstance(sock, ssl.SSLSocket):  # data TLS has buffered is not seen by poll
            return ready or bool(sock.pending())
        return ready

    def _bound_by_deadline(self, sock: socket.socket) -> None:
        if self.deadline is None:
            return
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("association request not received in time")
        sock.settimeout(remaining)

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(min(nr_bytes, READ_CHUNK))
        got = 0
        while got < nr_bytes:
            if got == len(buffer):  # full: grow, by no more than has arrived so far
                buffer.extend(bytes(min(len(buffer), nr_bytes - got)))
            self._bound_by_deadline(sock)
            with memoryview(buffer) as view:
                count = sock.recv_into(view[got:], len(buffer) - got)
            if not count:  # connection closed: what was read, as the stock recv does
                del buffer[got:]
                return buffer
            got += count
        return buffer


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def _uid(value: object) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def store_response_command(sop_class: object, sop_instance: object, message_id: int,
                           status: int) -> bytes:
    """A C-STORE-RSP command set, encoded as pynetdicom encodes it (a test compares).

    Little endian implicit VR, PS3.7 9.3.1.2: what a response with only a status
    holds. pynetdicom builds it through a general pydicom Dataset, about 0.2 ms
    of each instance's time on the receive path.
    """
    body = (_implicit(0x0000, 0x0002, _uid(sop_class))
            + _implicit(0x0000, 0x0100, struct.pack("<H", 0x8001))
            + _implicit(0x0000, 0x0120, struct.pack("<H", message_id))
            + _implicit(0x0000, 0x0800, struct.pack("<H", 0x0101))
            + _implicit(0x0000, 0x0900, struct.pack("<H", status))
            + _implicit(0x0000, 0x1000, _uid(sop_instance)))
    return _implicit(0x0000, 0x0000, struct.pack("<I", len(body))) + body


class DirectStoreResponses(DIMSEServiceProvider):
    """Sends a plain C-STORE response without building it as a pydicom Dataset.

    Anything else (other messages, a response with an error comment or an
    offending element, a bound EVT_DIMSE_SENT handler) takes pynetdicom's path.
    """

    def send_msg(self, primitive: DimsePrimitiveType, context_id: int) -> None:
        if (not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None
                or primitive.Status is None or primitive.ErrorComment is not None
                or primitive.OffendingElement is not None
                or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            super().send_msg(primitive, context_id)
            return
        command = store_response_command(
            primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID,
            int(primitive.MessageIDBeingRespondedTo), int(primitive.Status))
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)


def make_event_driven(assoc: Association, limits: ReadLimits = ReadLimits()) -> Association:
    """Switch a new, not yet started acceptor association to the event-driven loops."""
    if type(assoc.dul.socket) is AssociationSocket:
        assoc.dul.socket.__class__ = LargeReadSocket
        cast(LargeReadSocket, assoc.dul.socket).deadline = (
            time.monotonic() + limits.request_timeout)
    assoc.acse_timeout = min(assoc.acse_timeout or limits.request_timeout,
                             limits.request_timeout)  # how long it waits for the request
    if type(assoc.dimse) is DIMSEServiceProvider:
        assoc.dimse.__class__ = DirectStoreResponses
    assoc.dul.__class__ = EventDrivenDUL
    cast(EventDrivenDUL, assoc.dul).limits = limits
    cast(EventDrivenDUL, assoc.dul)._install()
    assoc.__class__ = EventDrivenAssociation
    cast(EventDrivenAssociation, assoc)._install()
    return assoc


class EventDrivenHandler(RequestHandler):
    """The request handler of an association server whose associations do not poll."""

    def _create_association(self) -> Association:
        limits = getattr(self.server, "read_limits", ReadLimits())
        assoc = make_event_driven(super()._create_association(), limits)
        ended = getattr(self.server, "association_ended", None)
        if ended is not None:  # told which peer's association ended (connection counts)
            address = self.client_address
            cast(EventDrivenAssociation, assoc).on_finished = lambda: ended(address)
        return assoc
