"""The node's receiver as tests run it: the same journal and ingest as ``serve``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import func, select

from db.schema import Instance
from node.receive.server import ReceiverServer, start_receiver
from node.settings import DicomSettings, Settings, StorageSettings
from node.store.ingest import BATCH_SECONDS, Ingest, journal_dir
from tests.conftest import Factory


@contextmanager
def running_receiver(root: Path, factory: Factory, dicom: DicomSettings, *,
                     min_free_mb: int = 1, max_instance_mb: float = 2048.0
                     ) -> Iterator[ReceiverServer]:
    """``start_receiver`` on ``root``; stopped (and its journal emptied) on exit."""
    with running_ingest(root, factory, dicom, min_free_mb=min_free_mb,
                        max_instance_mb=max_instance_mb) as (_ingest, server):
        yield server


@contextmanager
def running_ingest(root: Path, factory: Factory, dicom: DicomSettings, *,
                   min_free_mb: int = 1, max_instance_mb: float = 2048.0
                   ) -> Iterator[tuple[Ingest, ReceiverServer]]:
    """:func:`running_receiver`, also giving its ingest."""
    settings = Settings(dicom=dicom.model_copy(update={"max_instance_mb": max_instance_mb}),
                        storage=StorageSettings(dir=root, min_free_mb=min_free_mb))
    ingest, server = start_receiver(settings, factory, journal_dir(root, "test"))
    try:
        yield ingest, server
    finally:
        server.shutdown()
        ingest.stop()


def _rows(factory: Factory) -> int:
    with factory() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def settled_count(factory: Factory) -> int:
    """Instance rows once the ingest thread has caught up (it commits in batches)."""
    deadline = time.monotonic() + 5
    value = _rows(factory)
    while time.monotonic() < deadline:
        time.sleep(BATCH_SECONDS + 0.1)  # longer than the ingest thread gathers a batch
        now = _rows(factory)
        if now == value:
            return now
        value = now
    return value
