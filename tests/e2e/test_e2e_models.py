"""End to end for both built-in models, with every result object a destination can ask for.

A real chest radiograph yields an SR with the finding and its probability, a
fractional heatmap SEG and a secondary-capture "AI result" series; a chest CT
yields SEG + SR + secondary capture. Everything lands in Orthanc in the source
study, passes dciodvfy and reads back with highdicom and pydicom.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from tests.peers import (
    CHEST_CT,
    SAMPLES,
    NodeProcess,
    Orthanc,
    dciodvfy,
    start_node,
    storescu,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e
DX = SAMPLES / "chest-xray" / "DX_chest_PA_Canon_966_fixed.dcm"


@pytest.fixture
def node(tmp_path: Path, node_port: int, orthanc: Orthanc) -> Iterator[NodeProcess]:
    config = write_config(
        tmp_path / "ainode.toml", port=node_port, storage=tmp_path / "var",
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                       "port": orthanc.dicom_port,
                       "objects": ["SEG", "SR", "HEATMAP", "SC"]}],
        routes=[{"name": "cxr", "match": {"Modality": ["CR", "DX"]},
                 "models": ["cxr-pneumonia"], "destinations": ["pacs"]},
                {"name": "chest-ct", "match": {"Modality": "CT"}, "models": ["ct-lung"],
                 "destinations": ["pacs"]}])
    proc = start_node(config, node_port, tmp_path / "node.log")
    yield proc
    proc.stop()


def fetch(pacs: Orthanc, study_uid: str, modality: str, tmp_path: Path) -> list[Path]:
    paths = []
    for series in pacs.find_series(study_uid, modality):
        for instance in pacs.get(f"/series/{series}")["Instances"]:
            path = tmp_path / f"{modality}-{instance}.dcm"
            path.write_bytes(pacs.get_bytes(f"/instances/{instance}/file"))
            paths.append(path)
    return paths


def wait_for(pacs: Orthanc, study_uid: str, modalities: dict[str, int]) -> None:
    def arrived() -> bool:
        return all(len(pacs.find_series(study_uid, m)) >= n for m, n in modalities.items())

    wait_until(arrived, 240, interval=0.5, what=f"{modalities} in Orthanc")


def walk(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    """Every SR content item, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from walk(item)


def code_of(item: pydicom.Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def assert_valid(paths: list[Path]) -> None:
    for path in paths:
        errors, _ = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"


def test_radiograph_yields_sr_heatmap_and_secondary_capture(
        tmp_path: Path, node: NodeProcess, orthanc: Orthanc) -> None:
    out = storescu(node.port, DX, extra=("-xv",))  # as received: JPEG 2000 lossless
    assert "Received Store Response (Success)" in out.stderr, out.stderr
    study = str(pydicom.dcmread(DX, stop_before_pixels=True).StudyInstanceUID)
    wait_for(orthanc, study, {"SR": 1, "SEG": 1, "OT": 1})

    (sr_path,) = fetch(orthanc, study, "SR", tmp_path)
    (heat_path,) = fetch(orthanc, study, "SEG", tmp_path)
    sc_paths = fetch(orthanc, study, "OT", tmp_path)
    assert_valid([sr_path, heat_path, *sc_paths])

    sr = hd.sr.srread(sr_path)
    assert sr.VerificationFlag == "UNVERIFIED"
    items = list(walk(sr))
    (probability,) = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
                      if i.ValueType == "NUM" and code_of(i) == "111012"]  # Certainty of Finding
    assert 0.0 <= probability <= 1.0
    (evaluation,) = [i for i in items if i.ValueType == "CODE" and code_of(i) == "233604007"]
    present = evaluation.ConceptCodeSequence[0].CodeValue
    assert present in ("52101004", "2667000")  # Present / Absent
    texts = " ".join(str(i.TextValue) for i in items if i.ValueType == "TEXT").lower()
    assert "not" in texts and "verified" in texts and "radiologist" in texts

    heat = hd.seg.segread(heat_path)
    assert heat.SegmentationType == "FRACTIONAL"
    assert heat.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "233604007"
    assert heat.StudyInstanceUID == study

    (sc,) = [pydicom.dcmread(p) for p in sc_paths]
    assert sc.BurnedInAnnotation == "YES" and sc.StudyInstanceUID == study
    assert sc.SeriesDescription.startswith("AI cxr-pneumonia")


def test_ct_yields_seg_sr_and_key_images(tmp_path: Path, node: NodeProcess,
                                          orthanc: Orthanc) -> None:
    files = sorted(CHEST_CT.glob("*.dcm"))
    out = storescu(node.port, files)
    assert out.stderr.count("Received Store Response (Success)") == len(files)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    wait_for(orthanc, study, {"SEG": 1, "SR": 1, "OT": 1})
    seg_paths = fetch(orthanc, study, "SEG", tmp_path)
    sr_paths = fetch(orthanc, study, "SR", tmp_path)
    sc_paths = fetch(orthanc, study, "OT", tmp_path)
    assert len(seg_paths) == 1 and len(sr_paths) == 1  # no heatmap from ct-lung
    assert 1 <= len(sc_paths) <= 3
    assert_valid(seg_paths + sr_paths + sc_paths)
    for path in sc_paths:
        sc = pydicom.dcmread(path)
        assert sc.StudyInstanceUID == study and sc.SamplesPerPixel == 3
        assert sc.SeriesDescription.startswith("AI ct-lung")
