"""An association lost in the middle of a batch: objects never offered lose no attempt."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydicom import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlalchemy import select

from db.schema import Result, ResultStatus
from node.send.sender import send_due
from tests.conftest import Factory
from tests.integration.test_breaker import WallClock, outbox, settings_for
from tests.peers import free_port


def test_objects_not_offered_before_an_abort_keep_their_attempts(tmp_path: Path,
                                                                 factory: Factory) -> None:
    storage, port = tmp_path / "var", free_port()
    uids = outbox(factory, storage, 3)
    received: list[str] = []

    def handle_store(event: evt.Event) -> int | Dataset:
        received.append(str(event.request.AffectedSOPInstanceUID))
        event.assoc.abort()  # the destination drops the association at the first object
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    wall = WallClock()
    try:
        wall.now += timedelta(hours=1)
        send_due(settings_for(storage, port), factory, wall)
    finally:
        server.shutdown()
    assert received == uids[:1]  # only the first was offered
    with factory() as s:
        rows = {r.sop_instance_uid: r for r in s.scalars(select(Result))}
    first = rows[uids[0]]
    assert first.attempts == 1 and first.status is ResultStatus.PENDING
    for uid in uids[1:]:  # never offered: queued again, due now, no attempt counted
        row = rows[uid]
        assert (row.status, row.attempts, row.lease_owner) == (ResultStatus.PENDING, 0, None)
        assert row.next_attempt_at is not None and row.next_attempt_at <= wall.now
