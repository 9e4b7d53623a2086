"""A destination that stores with a warning status: delivered (sent, never resent), warned.

The destination is a pynetdicom SCP whose C-STORE handler answers a warning status
(PS3.4 B.2.3); the node's sender sends it a real SR from the outbox.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlalchemy import select

from db.admin import job_detail
from db.schema import Result, ResultStatus
from node.send.sender import send_due
from tests.conftest import Factory
from tests.integration.test_breaker import WallClock, outbox, settings_for
from tests.peers import free_port


@contextmanager
def destination(port: int, status: int, received: list[str]) -> Iterator[None]:
    """An SCP (AE title PACS) that answers every C-STORE with ``status``."""

    def handle_store(event: evt.Event) -> Dataset:
        received.append(str(event.request.AffectedSOPInstanceUID))
        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = "patient name coerced"
        return answer

    ae = AE(ae_title="PACS")
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        yield
    finally:
        server.shutdown()


@pytest.mark.parametrize(("status", "meaning"), [
    (0xB000, "Coercion of Data Elements"),
    (0xB006, "Element Discarded"),
    (0xB007, "Data Set Does Not Match SOP Class"),
])
def test_warning_status_is_sent_with_the_warning_recorded_and_not_resent(
        tmp_path: Path, factory: Factory, caplog: pytest.LogCaptureFixture, status: int,
        meaning: str) -> None:
    storage, port = tmp_path / "var", free_port()
    (uid,) = outbox(factory, storage, 1)
    settings = settings_for(storage, port)
    wall = WallClock()
    received: list[str] = []
    caplog.set_level(logging.INFO, "ainode.sender")
    with destination(port, status, received):
        wall.now += timedelta(hours=1)
        assert send_due(settings, factory, wall) == 1
        for _ in range(3):  # long past any retry delay: nothing is due again
            wall.now += timedelta(hours=1)
            assert send_due(settings, factory, wall) == 0
    assert received == [uid]

    with factory() as s:
        row = s.scalars(select(Result)).one()
    assert (row.status, row.attempts, row.last_error) == (ResultStatus.SENT, 1, None)
    assert row.warning_status == status
    assert row.warning == f"C-STORE warning 0x{status:04X}: {meaning} (patient name coerced)"

    (warned,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"0x{status:04X}" in warned.getMessage() and uid in warned.getMessage()

    (shown,) = job_detail(factory, row.job_id).results
    assert (shown.status, shown.warning_status, shown.warning) == ("sent", status, row.warning)


def test_plain_success_records_no_warning(tmp_path: Path, factory: Factory) -> None:
    storage, port = tmp_path / "var", free_port()
    outbox(factory, storage, 1)
    received: list[str] = []
    with destination(port, 0x0000, received):
        assert send_due(settings_for(storage, port), factory, WallClock()) == 1
    with factory() as s:
        row = s.scalars(select(Result)).one()
    assert (row.status, row.warning_status, row.warning) == (ResultStatus.SENT, None, None)
