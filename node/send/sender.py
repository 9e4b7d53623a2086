"""Deliver the outbox: C-STORE each pending result to its destination, with retries.

A sender first claims the rows it sends (status ``sending`` with a lease), so
several nodes sharing one database never send one result twice. A success is
recorded as soon as the destination acknowledges it, so nothing is sent twice
after a restart; the one window (a crash between the acknowledgement and the
commit, after which the lease expires) resends an object with the same SOP
Instance UID, which the PACS overwrites.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import ssl
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import (
    GENERAL_STATUS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    Status,
    code_to_category,
)

from db.queue import (
    ResultRecord,
    SessionFactory,
    StoreWarning,
    claim_results,
    mark_send_failed,
    mark_sent,
    release_results,
)
from node.dimse import VERIFICATION
from node.errors import SendError
from node.runtime.faults import crash_point
from node.send.breaker import CircuitBreaker
from node.settings import Destination, SendSettings, Settings, TLSSettings
from node.tls import client_context

log = logging.getLogger("ainode.sender")

PERMANENT = frozenset({"Refused: SOP Class Not Supported", "Refused: Not Authorised",
                       "Unrecognised Operation", "Invalid Object Instance"})
PERMANENT_STATUSES = frozenset(code for code, (_category, meaning) in GENERAL_STATUS.items()
                               if meaning in PERMANENT)
"""Statuses that will not change by retrying: the destination refuses this object (PS3.7 C)."""
CLAIM_BATCH = 16
"""Results claimed per round; the lease covers one network timeout per result."""


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    message: str


def backoff(attempts: int, send: SendSettings, rng: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter: base * 2^(attempts-1), capped, times 0.5-1.0."""
    delay = min(send.backoff_base_seconds * 2 ** max(attempts - 1, 0), send.backoff_max_seconds)
    return float(delay * (0.5 + 0.5 * rng()))


def _ae(calling: str, timeout: float) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def tls_args(dest: Destination, own: TLSSettings) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``dest``: None unless its ``tls.enabled``."""
    if not dest.tls.enabled:
        return None
    return client_context(dest.tls, own), dest.host


def _associate(ae: AE, dest: Destination, tls: tuple[ssl.SSLContext, str] | None
               ) -> Association:
    return ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)


def echo(dest: Destination, calling: str, timeout: float = 10.0,
         own_tls: TLSSettings | None = None) -> EchoResult:
    """C-ECHO a destination (over TLS when its ``tls.enabled``)."""
    ae = _ae(dest.calling_ae_title or calling, timeout)
    ae.add_requested_context(VERIFICATION)
    assoc = _associate(ae, dest, tls_args(dest, own_tls or TLSSettings()))
    if not assoc.is_established:
        return EchoResult(False, f"association with {dest.ae_title}@{dest.host}:{dest.port} "
                                 "rejected, aborted or never connected")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status and status.Status == Status.SUCCESS:
        return EchoResult(True, "C-ECHO success")
    code = f"0x{status.Status:04X}" if status else "no response"
    return EchoResult(False, f"C-ECHO failed: {code}")


def store_warning(status: Dataset) -> StoreWarning | None:
    """The warning of a C-STORE response whose status is a warning (stored all the same).

    Storage warnings are 0xBxxx (PS3.4 B.2.3: 0xB000 coercion of data elements, 0xB006
    elements discarded, 0xB007 data set does not match the SOP class), and the general
    warnings 0x0001, 0x0107, 0x0116 (PS3.7 C). The text is the status's meaning and the
    destination's Error Comment, if it sent one.
    """
    code = int(status.Status)
    if code_to_category(code) != STATUS_WARNING:
        return None
    _category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(
        code, GENERAL_STATUS.get(code, ("Warning", "Warning")))
    comment = str(status.get("ErrorComment", "") or "").strip()
    text = f"C-STORE warning 0x{code:04X}: {meaning}" + (f" ({comment})" if comment else "")
    return StoreWarning(code, text)


def _store(assoc: Association, path: str) -> StoreWarning | None:
    """C-STORE one file: None when stored, its warning when stored with a warning status;
    raise :class:`SendError` unless the destination stored it."""
    try:
        status = assoc.send_c_store(path)
    except ValueError as exc:  # no accepted presentation context for this SOP class
        raise SendError(f"destination did not accept the presentation context: {exc}",
                        retryable=False) from exc
    if not status or "Status" not in status:
        raise SendError("no response to C-STORE (timeout or abort)")
    code = int(status.Status)
    if code == Status.SUCCESS:
        return None
    warning = store_warning(status)
    if warning is not None:
        return warning
    raise SendError(f"C-STORE status 0x{code:04X}", retryable=code not in PERMANENT_STATUSES)


def deliver(dest: Destination, calling: str, results: Sequence[ResultRecord], root: str,
            timeout: float, on_sent: Callable[[ResultRecord, StoreWarning | None], None],
            on_failed: Callable[[ResultRecord, SendError], None],
            tls: tuple[ssl.SSLContext, str] | None = None,
            on_skipped: Callable[[Sequence[ResultRecord]], None] | None = None
            ) -> SendError | None:
    """Send ``results`` to one destination over one association (TLS with ``tls``).

    Returns the connection-level failure (no association, or it was lost), if any;
    per-object refusals are reported through ``on_failed`` only; ``on_sent`` gets the
    warning of an object stored with a warning status. Objects never offered because
    the association was lost before their turn go to ``on_skipped`` (no attempt made;
    without it, they count as failed).
    """
    ae = _ae(dest.calling_ae_title or calling, timeout)
    for sop_class in sorted({r.sop_class_uid for r in results}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = _associate(ae, dest, tls)
    if not assoc.is_established:
        error = SendError(f"cannot associate with {dest.ae_title}@{dest.host}:{dest.port}")
        for result in results:
            on_failed(result, error)
        return error
    lost: SendError | None = None
    try:
        for index, result in enumerate(results):
            if not assoc.is_established:
                lost = SendError("association lost before this object was sent")
                rest = results[index:]
                if on_skipped is not None:
                    on_skipped(rest)
                else:
                    for skipped in rest:
                        on_failed(skipped, lost)
                break
            try:
                warning = _store(assoc, f"{root}/{result.path}")
            except SendError as exc:
                on_failed(result, exc)
            else:
                crash_point("sender.stored")
                on_sent(result, warning)
        if lost is None and not assoc.is_established:  # e.g. aborted after a C-STORE timeout
            lost = SendError("association lost during the transfer")
    finally:
        if assoc.is_established:
            assoc.release()
    return lost


def sender_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:sender"


def send_due(settings: Settings, factory: SessionFactory, clock: Callable[[], datetime],
             owner: str | None = None, breaker: CircuitBreaker | None = None) -> int:
    """Claim and send a batch of due results; return how many were acknowledged.

    With ``breaker``, destinations whose circuit is open are skipped before claiming
    (their results stay as they are: not claimed, no attempt counted), and the
    outcome of each association is recorded in it.
    """
    owner = owner or sender_owner()
    allowed: set[str] = set()
    blocked: set[str] = set()
    if breaker is not None:
        for configured in settings.destinations:
            (allowed if breaker.allow(configured.name) else blocked).add(configured.name)
    attempted: set[str] = set()
    try:
        return _send_batch(settings, factory, clock, owner, breaker, blocked, attempted)
    finally:
        if breaker is not None:
            for name in allowed - attempted:  # a half-open trial with nothing to send
                breaker.release(name)


def _send_batch(settings: Settings, factory: SessionFactory, clock: Callable[[], datetime],
                owner: str, breaker: CircuitBreaker | None, blocked: set[str],
                attempted: set[str]) -> int:
    lease = settings.send.timeout_seconds * (CLAIM_BATCH + 3)
    pending = claim_results(factory, owner, clock(), lease, limit=CLAIM_BATCH, exclude=blocked)
    if not pending:
        return 0
    by_dest: dict[str, list[ResultRecord]] = defaultdict(list)
    for result in pending:
        by_dest[result.destination].append(result)
    sent = 0

    def on_sent(result: ResultRecord, warning: StoreWarning | None) -> None:
        nonlocal sent
        mark_sent(factory, result.id, clock(), owner, warning=warning)
        sent += 1
        if warning is None:
            log.info("result %d (%s sop=%s) acknowledged by %s", result.id, result.kind,
                     result.sop_instance_uid, result.destination)
        else:
            log.warning("result %d (%s sop=%s) stored by %s with a warning, status 0x%04X: %s",
                        result.id, result.kind, result.sop_instance_uid, result.destination,
                        warning.status, warning.text)

    def on_failed(result: ResultRecord, exc: SendError) -> None:
        now = clock()
        retry_at = (now + timedelta(seconds=backoff(result.attempts + 1, settings.send))
                    if exc.retryable else None)
        status = mark_send_failed(factory, result.id, now, str(exc), retry_at=retry_at,
                                  max_attempts=settings.send.max_attempts, owner=owner)
        log.warning("result %d (%s sop=%s) to %s failed (attempt %d): %s; now %s",
                    result.id, result.kind, result.sop_instance_uid, result.destination,
                    result.attempts + 1, exc, status.value)

    def on_skipped(results: Sequence[ResultRecord]) -> None:
        released = release_results(factory, [r.id for r in results], owner, clock())
        log.warning("association to %s lost: %d result(s) not offered, queued again "
                    "without counting an attempt", results[0].destination, released)

    for name, results in by_dest.items():
        try:
            dest = settings.destination(name)
        except KeyError:
            for result in results:
                on_failed(result, SendError(f"destination {name!r} is not configured",
                                            retryable=False))
            continue
        attempted.add(name)
        failure: SendError | None = SendError("error while sending")
        try:
            failure = deliver(dest, settings.dicom.ae_title, results, str(settings.storage.dir),
                              settings.send.timeout_seconds, on_sent, on_failed,
                              tls_args(dest, settings.dicom.tls), on_skipped)
        finally:
            if breaker is not None:
                if failure is None:
                    breaker.record_success(name)
                else:
                    breaker.record_failure(name, str(failure))
    return sent
