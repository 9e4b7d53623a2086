"""Inputs a model must not run on are skipped with a reason in the job, not turned into results."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.queue import (
    claim_job,
    due_results,
)
from db.schema import Job, JobStatus
from models.registry import discover
from node.infer.worker import Worker
from node.runtime.clock import utcnow
from node.settings import parse_settings
from tests.peers import CHEST_CT, SAMPLES, stage_series

MPR = SAMPLES / "edge-ct-single-slice-mpr"


def run_job(tmp_path: Path, factory: sessionmaker[Session], files: list[Path], model: str
            ) -> Job:
    settings = parse_settings(f'[storage]\ndir = "{tmp_path / "var"}"\n')
    stage_series(factory, settings.storage.dir, files, model)
    worker = Worker(settings=settings, factory=factory, registry=discover(), clock=utcnow)
    while (job := claim_job(factory, worker.owner, utcnow(), 60)) is not None:
        worker.process(job)
    with factory() as s:
        return s.scalars(select(Job).order_by(Job.id)).first()  # type: ignore[return-value]


@pytest.mark.parametrize(("files", "model", "reason"), [
    ([MPR / "A048383_coronal_19001231-057.dcm"], "ct-lung", "slice"),
    ([MPR / "A048383_axial_19001231-30.dcm"], "ct-lung", "slice"),
    ([SAMPLES / "compressed-misc" / "MAROTECH_CT_JP2Lossy.dcm"], "ct-lung", "localizer"),
    (sorted(CHEST_CT.glob("*.dcm"))[:5], "ct-lung", "at least 10"),
    ([SAMPLES / "brain-mr-btp-pgbm-001" / "1-01.dcm"], "ct-lung", "modality"),
    (sorted(CHEST_CT.glob("*.dcm"))[:1], "cxr-pneumonia", "modality"),
])
def test_unsuitable_input_is_skipped_with_a_reason(
        tmp_path: Path, factory: sessionmaker[Session], files: list[Path], model: str,
        reason: str) -> None:
    job = run_job(tmp_path, factory, files, model)
    assert job.status is JobStatus.SKIPPED, job.last_error
    assert reason in (job.last_error or "").lower()
    assert due_results(factory, utcnow()) == []


def test_ct_lung_refuses_a_coronal_reformat() -> None:
    import numpy as np

    from models.base import UnsupportedInput, Volume
    from models.ct_lung import CtLungModel

    coronal = Volume(np.full((40, 64, 64), -1000, np.float32), (1.0, 1.0, 1.0), "CT",
                     orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    with pytest.raises(UnsupportedInput, match="axial"):
        CtLungModel().check_input(coronal)
