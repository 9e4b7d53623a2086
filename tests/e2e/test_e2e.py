"""End to end: Orthanc as the PACS, dcmtk as the sender, the node's own processes.

A real chest CT goes in with storescu; a SEG and a TID 1500 SR come back into
the same study in Orthanc, valid by dciodvfy, readable by highdicom, exactly once,
also when the PACS is down for a while, a worker is killed mid-job, or the node
is killed with queued work.
"""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from db.schema import Instance, Job, JobStatus, Result, ResultStatus
from tests.peers import (
    CHEST_CT,
    NodeProcess,
    Orthanc,
    ainode,
    dciodvfy,
    free_port,
    start_node,
    start_orthanc,
    stop_process,
    storescu,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e
CT_FILES = sorted(CHEST_CT.glob("*.dcm"))
STUDY_UID = str(pydicom.dcmread(CT_FILES[0], stop_before_pixels=True).StudyInstanceUID)
RESULT_TIMEOUT = 240


def config_for(tmp_path: Path, node_port: int, pacs_port: int, workers: int = 1) -> Path:
    return write_config(
        tmp_path / "ainode.toml", port=node_port, storage=tmp_path / "var", workers=workers,
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                       "port": pacs_port}],
        routes=[{"name": "chest-ct", "match": {"Modality": "CT"}, "models": ["ct-lung"],
                 "destinations": ["pacs"]}],
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'ainode.db'}")
    yield engine
    engine.dispose()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Any]]:
    """Processes a test starts; all are stopped by PID at the end."""
    procs: list[Any] = []
    yield procs
    for proc in reversed(procs):
        if isinstance(proc, NodeProcess | Orthanc):
            proc.stop()
        else:
            stop_process(proc)


def push_ct(node_port: int) -> None:
    out = storescu(node_port, CT_FILES)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("Received Store Response (Success)") == len(CT_FILES)


def results_in_pacs(pacs: Orthanc) -> dict[str, list[str]]:
    return {m: pacs.find_series(STUDY_UID, m) for m in ("SEG", "SR")}


def wait_for_results(pacs: Orthanc) -> dict[str, list[str]]:
    return wait_until(lambda: (r := results_in_pacs(pacs)) and all(r.values()) and r,
                      RESULT_TIMEOUT, interval=0.5, what="SEG and SR in Orthanc")  # type: ignore[no-any-return]


def instances_of(pacs: Orthanc, series_id: str) -> list[str]:
    return list(pacs.get(f"/series/{series_id}")["Instances"])


def jobs(db: Engine) -> list[Job]:
    with Session(db) as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def results(db: Engine) -> list[Result]:
    with Session(db) as s:
        return list(s.scalars(select(Result).order_by(Result.id)))


def assert_delivered_once(pacs: Orthanc, db: Engine) -> dict[str, list[str]]:
    found = wait_for_results(pacs)
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1, found
    assert len(instances_of(pacs, found["SEG"][0])) == 1
    assert len(instances_of(pacs, found["SR"][0])) == 1
    wait_until(lambda: all(r.status is ResultStatus.SENT for r in results(db)), 30,
               what="outbox rows marked sent")
    done = [j for j in jobs(db) if j.status is JobStatus.DONE]
    assert len(done) == 1
    assert sorted(r.kind for r in results(db)) == ["SEG", "SR"]
    return found


def test_chest_ct_comes_back_as_seg_and_sr(tmp_path: Path, node_port: int, orthanc: Orthanc,
                                           db: Engine, started: list[Any]) -> None:
    config = config_for(tmp_path, node_port, orthanc.dicom_port)
    node = start_node(config, node_port, tmp_path / "node.log")
    started.append(node)
    push_ct(node_port)
    found = assert_delivered_once(orthanc, db)

    seg_id = instances_of(orthanc, found["SEG"][0])[0]
    sr_id = instances_of(orthanc, found["SR"][0])[0]
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg_path.write_bytes(orthanc.get_bytes(f"/instances/{seg_id}/file"))
    sr_path.write_bytes(orthanc.get_bytes(f"/instances/{sr_id}/file"))
    for path in (seg_path, sr_path):
        errors, _ = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"

    seg = hd.seg.segread(seg_path)
    sr = hd.sr.srread(sr_path)
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in CT_FILES}
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == STUDY_UID
    assert seg.SeriesDescription.startswith("AI ct-lung")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Right lung", "Left lung"]
    seg_refs = {ref.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                for ref in series.ReferencedInstanceSequence}
    assert seg_refs <= sources and len(seg_refs) >= 10

    # The SR's measurement groups reference the SEG's segments and the source CT.
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    volumes = {}
    for group in groups:
        ref = group.referenced_segment
        assert isinstance(ref, hd.sr.ReferencedSegment)
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        (number,) = ref.referenced_segment_numbers
        assert number in (1, 2)
        source_refs = {item.referenced_sop_instance_uid
                       for item in ref.source_images_for_segmentation}
        assert source_refs and source_refs <= sources
        volume = next(m for m in group.get_measurements() if m.name.meaning == "Volume")
        assert volume.unit.value == "ml"
        volumes[number] = volume.value
    # Physiologically plausible lungs for this adult chest (apex to upper abdomen).
    for number, ml in volumes.items():
        assert 1000 <= ml <= 5000, f"segment {number}: {ml} mL"
    assert sr.VerificationFlag == "UNVERIFIED"

    log = node.log()
    assert "Lung_Dx-A0002" not in log  # the sample's patient name and ID are never logged


def test_pacs_down_during_send_then_up_delivers_once(tmp_path: Path, node_port: int, db: Engine,
                                                     started: list[Any]) -> None:
    pacs_port = free_port()
    config = config_for(tmp_path, node_port, pacs_port)
    node = start_node(config, node_port, tmp_path / "node.log")
    started.append(node)
    push_ct(node_port)
    # The PACS is down: sends fail and are retried with backoff.
    wait_until(lambda: (r := results(db)) and all(x.attempts >= 2 for x in r), RESULT_TIMEOUT,
               interval=0.5, what="failed send attempts")
    assert all(r.status is ResultStatus.PENDING for r in results(db))
    pacs = start_orthanc(tmp_path / "orthanc", node_port, dicom_port=pacs_port)
    started.append(pacs)
    assert_delivered_once(pacs, db)


def test_worker_killed_mid_job_is_requeued_and_completed_once(
        tmp_path: Path, node_port: int, orthanc: Orthanc, db: Engine, started: list[Any]) -> None:
    config = config_for(tmp_path, node_port, orthanc.dicom_port, workers=0)
    node = start_node(config, node_port, tmp_path / "node.log")
    started.append(node)
    push_ct(node_port)
    worker = ainode("worker", "--config", str(config), log_path=tmp_path / "worker1.log")
    started.append(worker)
    wait_until(lambda: any(j.status is JobStatus.RUNNING for j in jobs(db)), RESULT_TIMEOUT,
               interval=0.02, what="a running job")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    job = jobs(db)[0]
    assert job.status is JobStatus.RUNNING and results(db) == []
    second = ainode("worker", "--config", str(config), log_path=tmp_path / "worker2.log")
    started.append(second)
    assert_delivered_once(orthanc, db)
    job = jobs(db)[0]
    assert job.attempts == 2 and "expired" in (tmp_path / "node.log").read_text() + \
        (tmp_path / "worker2.log").read_text()


def test_killed_node_with_queued_work_loses_nothing(tmp_path: Path, node_port: int,
                                                    orthanc: Orthanc, db: Engine,
                                                    started: list[Any]) -> None:
    no_workers = config_for(tmp_path, node_port, orthanc.dicom_port, workers=0)
    node = start_node(no_workers, node_port, tmp_path / "node.log")
    push_ct(node_port)
    wait_until(lambda: any(j.status is JobStatus.QUEUED for j in jobs(db)), 60,
               what="a queued job")
    os.killpg(node.proc.pid, signal.SIGKILL)
    node.proc.wait()
    config = config_for(tmp_path, node_port, orthanc.dicom_port, workers=1)
    node = start_node(config, node_port, tmp_path / "node2.log")
    started.append(node)
    assert_delivered_once(orthanc, db)


def test_late_images_replace_the_results_instead_of_adding_contradicting_ones(
        tmp_path: Path, node_port: int, orthanc: Orthanc, db: Engine,
        started: list[Any]) -> None:
    """A study completed, its results sent; then more of its images arrive. The new run's
    SEG and SR carry the first run's UIDs, so Orthanc holds one SEG and one SR, and they
    are the new ones (covering every slice), not two results that disagree."""
    config = config_for(tmp_path, node_port, orthanc.dicom_port)
    node = start_node(config, node_port, tmp_path / "node.log")
    started.append(node)
    first, late = CT_FILES[:20], CT_FILES[20:]
    assert storescu(node_port, first).returncode == 0
    found = assert_delivered_once(orthanc, db)
    seg_uid = orthanc.get(f"/instances/{instances_of(orthanc, found['SEG'][0])[0]}/simplified-tags")
    assert storescu(node_port, late).returncode == 0
    wait_until(lambda: len([j for j in jobs(db) if j.status is JobStatus.DONE]) == 2,
               RESULT_TIMEOUT, interval=0.5, what="the second run done")
    wait_until(lambda: all(r.status is ResultStatus.SENT for r in results(db)), 60,
               what="the replacements sent")
    again = results_in_pacs(orthanc)
    assert again == found  # the same SEG and SR series in the PACS, no second set
    for series in (again["SEG"][0], again["SR"][0]):
        assert len(instances_of(orthanc, series)) == 1
    (seg_id,) = instances_of(orthanc, again["SEG"][0])
    seg = hd.seg.segread(io.BytesIO(orthanc.get_bytes(f"/instances/{seg_id}/file")))
    assert seg.SOPInstanceUID == seg_uid["SOPInstanceUID"]
    refs = {ref.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
            for ref in series.ReferencedInstanceSequence}
    late_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in late}
    assert refs & late_uids  # the replacement is the second run's: it covers the late slices
    assert sorted(r.kind for r in results(db)) == ["SEG", "SR"]  # rows taken over, not added


def test_a_write_fault_holds_the_study_then_delivers_one_result_set(
        tmp_path: Path, node_port: int, orthanc: Orthanc, db: Engine,
        started: list[Any]) -> None:
    """Some instance files cannot be written for a while (as on a full disk). Every C-STORE
    is acknowledged once durable in the journal; no job starts on the part of the study
    already recorded while the rest waits; once the fault clears, without a restart,
    exactly one SEG and one SR reach the PACS."""
    config = config_for(tmp_path, node_port, orthanc.dicom_port)
    node = start_node(config, node_port, tmp_path / "node.log")
    started.append(node)
    def recorded() -> int:
        with Session(db) as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)

    assert storescu(node_port, CT_FILES[:10]).returncode == 0
    wait_until(lambda: recorded() == 10, 30, what="the first 10 slices recorded")
    late = pydicom.dcmread(CT_FILES[-1], stop_before_pixels=True)
    blocker = (tmp_path / "var" / "instances" / late.StudyInstanceUID / late.SeriesInstanceUID
               / f"{late.SOPInstanceUID}.dcm")
    (blocker / "x").mkdir(parents=True)  # a folder where that file goes: its batch fails
    out = storescu(node_port, CT_FILES[10:])
    assert out.returncode == 0 and out.stderr.count("(Success)") == 20  # durable: journal
    wait_until(lambda: "ingest: cannot write" in node.log(), 30,
               what="the fault logged")
    time.sleep(4)  # well past the 1 s quiet period
    assert recorded() == 10
    assert jobs(db) == []  # held: not completed on the 10 slices recorded so far
    (blocker / "x").rmdir()
    blocker.rmdir()
    assert_delivered_once(orthanc, db)
    (job,) = jobs(db)
    assert recorded() == len(CT_FILES) and job.status is JobStatus.DONE
