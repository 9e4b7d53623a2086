"""No PHI in logs: a CT series with a canary patient name and ID goes through the whole
path (storescu -> node -> worker -> SEG/SR -> Orthanc), with a rejected and a duplicate
instance on the way, and neither canary appears in any log line of the node or its
workers at the default level.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine

from node.settings import LoggingSettings
from tests.e2e.test_e2e import assert_delivered_once, config_for
from tests.peers import CHEST_CT, Orthanc, start_node, storescu

pytestmark = pytest.mark.e2e
NAME, PATIENT_ID = "PHI^CANARY", "CANARY-ID"
CANARIES = (NAME, PATIENT_ID, "CANARY")


def canary_series(out: Path) -> list[Path]:
    """The sample CT under the canary patient (same study UIDs, so the e2e helpers apply)."""
    out.mkdir()
    files = []
    for path in sorted(CHEST_CT.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = NAME, PATIENT_ID
        ds.OtherPatientIDs = PATIENT_ID
        files.append(out / path.name)
        ds.save_as(files[-1], enforce_file_format=True)
    return files


def test_canary_patient_never_reaches_the_logs(tmp_path: Path, node_port: int,
                                               orthanc: Orthanc) -> None:
    assert LoggingSettings().level == "INFO"  # the default level is what is tested
    files = canary_series(tmp_path / "canary")
    broken = pydicom.dcmread(files[0])
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del broken.StudyInstanceUID  # refused with 0xC210: the refusal is logged
    broken.save_as(tmp_path / "broken.dcm", enforce_file_format=True)

    config = config_for(tmp_path, node_port, orthanc.dicom_port)
    node = start_node(config, node_port, tmp_path / "node.log")
    db = create_engine(f"sqlite:///{tmp_path / 'var' / 'ainode.db'}")
    try:
        out = storescu(node_port, [*files, tmp_path / "broken.dcm", files[0]])
        assert out.stderr.count("Received Store Response (Success)") == len(files) + 1
        assert_delivered_once(orthanc, db)
        # The objects that reached the PACS do carry the patient (that is their purpose).
        (seg,) = orthanc.find_series(
            str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), "SEG")
        assert orthanc.get(f"/series/{seg}/patient")["MainDicomTags"]["PatientID"] == PATIENT_ID
    finally:
        node.stop()
        db.dispose()
    log = node.log()
    assert "store rejected" in log and "job 1 done" in log and "acknowledged by pacs" in log
    assert "started worker process" in log  # the workers' output is in this log too
    leaks = [line for line in log.splitlines() if any(c in line.upper() for c in CANARIES)]
    assert leaks == []
