"""SEG and SR result objects: built from the real chest CT and radiograph, validated, read back.

Every object is written to a file and checked with dicom3tools ``dciodvfy`` (zero
errors) and, for SR, dcmtk ``dsrdump``; then read back with pydicom and highdicom.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from models.base import Code, Finding, Measurement, Prediction, Segment
from node.results import ResultContext, build_seg, build_sr
from node.results.common import coded, result_uids, series_description, source_headers
from node.results.seg import segment_pixels
from node.results.sr import MAX_LISTED_IMAGES, procedure_code
from tests.peers import SAMPLES as PEER_SAMPLES
from tests.peers import dciodvfy

SAMPLES = PEER_SAMPLES
CT_DIR = SAMPLES / "chest-ct-lung-pet-ct-dx-a0002"
CXR_FILE = SAMPLES / "chest-xray" / "NIH_CXR14_SC_Covid0000.dcm"

ANATOMY = Code("91723000", "SCT", "Anatomical Structure")
LUNG = Code("39607008", "SCT", "Lung")
RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")
VOLUME = Code("118565006", "SCT", "Volume")
ML = Code("ml", "UCUM", "milliliter")
ATTENUATION = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
PERCENT = Code("%", "UCUM", "Percent")
CALCIFIED_PERCENT = Code("112019", "DCM", "Calcification extent as percent of volume")
NODULE = Code("27925004", "SCT", "Nodule")
PNEUMOTHORAX = Code("36118008", "SCT", "Pneumothorax")

PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)



# --------------------------------------------------------------------------- helpers


def dsrdump(path: Path) -> str:
    """Run dcmtk's dsrdump on ``path`` and return its output; fails the test if it fails."""
    proc = subprocess.run(
        ["dsrdump", "+Pc", "+Pl", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "E:" not in proc.stderr, proc.stderr
    return proc.stdout


def read_report(path: Path) -> tuple[hd.sr.Comprehensive3DSR, hd.sr.MeasurementReport]:
    """Read an SR with highdicom; its content must be a TID 1500 Measurement Report."""
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return sr, report


def procedure_item(sr: Dataset) -> Dataset:
    """The root's Procedure Reported (121058, DCM) content item."""
    item: Dataset = next(
        item for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    )
    return item


def evaluation_value(evaluation: hd.sr.QualitativeEvaluation) -> str:
    """Code value of a qualitative evaluation's answer (highdicom types ``.value`` as a number)."""
    value: str = evaluation[0].ConceptCodeSequence[0].CodeValue
    return value


def box(shape: tuple[int, int, int], z: slice, y: slice, x: slice) -> npt.NDArray[np.bool_]:
    mask = np.zeros(shape, dtype=bool)
    mask[z, y, x] = True
    return mask


def same_code(item: Dataset | hd.sr.CodedConcept, code: Code) -> bool:
    return (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == (
        code.value,
        code.scheme,
        code.meaning,
    )


def context(seed: str, name: str = "ct-lung", version: str = "1.0.0") -> ResultContext:
    return ResultContext(
        model_name=name,
        model_version=version,
        algorithm_version=f"{version}+w.abc123",
        software_version="0.1.0",
        uid_seed=seed,
    )


def lung_prediction(shape: tuple[int, int, int]) -> Prediction:
    right = box(shape, slice(3, 22), slice(140, 360), slice(70, 240))
    left = box(shape, slice(3, 24), slice(140, 360), slice(280, 440))
    left[10:12] = False  # two empty slices inside the left lung: omitted frames
    return Prediction(
        segments=[
            Segment(1, "Right lung", ANATOMY, LUNG, right, type_modifier=RIGHT),
            Segment(2, "Left lung", ANATOMY, LUNG, left, type_modifier=LEFT,
                    tracking_id="lung-left"),
        ],
        measurements=[
            Measurement(VOLUME, 2345.678, ML, segment_number=1),
            Measurement(ATTENUATION, -812.5, HU, segment_number=1, derivation=MEAN),
            Measurement(VOLUME, 2101.25, ML, segment_number=2),
            Measurement(ATTENUATION, -830.75, HU, segment_number=2, derivation=MEAN),
            Measurement(CALCIFIED_PERCENT, 12.5, PERCENT, segment_number=None),
        ],
        findings=[Finding(NODULE, probability=0.87, threshold=0.5)],
    )


@dataclass(frozen=True)
class Case:
    """One built result set and where it was written."""

    sources: list[Dataset]
    prediction: Prediction
    ctx: ResultContext
    seg: hd.seg.Segmentation | None
    sr: hd.sr.Comprehensive3DSR
    seg_path: Path | None
    sr_path: Path


def build_case(
    directory: Path, name: str, sources: Sequence[Dataset], prediction: Prediction,
    ctx: ResultContext,
) -> Case:
    seg = build_seg(sources, prediction, ctx)
    sr = build_sr(sources, prediction, ctx, seg)
    seg_path = None
    if seg is not None:
        seg_path = directory / f"{name}-seg.dcm"
        seg.save_as(seg_path)
    sr_path = directory / f"{name}-sr.dcm"
    sr.save_as(sr_path)
    return Case(list(sources), prediction, ctx, seg, sr, seg_path, sr_path)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def ct_slices() -> list[Dataset]:
    """The 30-slice chest CT, in volume order (increasing z)."""
    slices = [pydicom.dcmread(path) for path in sorted(CT_DIR.glob("*.dcm"))]
    assert len(slices) == 30
    return sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture(scope="session")
def cxr() -> Dataset:
    """The NIH chest radiograph (secondary capture with a minimal header)."""
    return pydicom.dcmread(CXR_FILE)


def ct_shape(slices: Sequence[Dataset]) -> tuple[int, int, int]:
    return len(slices), int(slices[0].Rows), int(slices[0].Columns)


@pytest.fixture(scope="module")
def lungs(ct_slices: list[Dataset], tmp_path_factory: pytest.TempPathFactory) -> Case:
    """Two lung segments with measurements, a study measurement and a finding."""
    prediction = lung_prediction(ct_shape(ct_slices))
    directory = tmp_path_factory.mktemp("lungs")
    return build_case(directory, "lungs", ct_slices, prediction, context("job-lungs"))


@pytest.fixture(scope="module")
def single(ct_slices: list[Dataset], tmp_path_factory: pytest.TempPathFactory) -> Case:
    """One segment (a nodule), one measurement: the single-segment SEG case."""
    shape = ct_shape(ct_slices)
    nodule = box(shape, slice(12, 15), slice(300, 330), slice(120, 150))
    prediction = Prediction(
        segments=[
            Segment(1, "Nodule", Code("49755003", "SCT", "Morphologically Abnormal Structure"),
                    NODULE, nodule)
        ],
        measurements=[Measurement(VOLUME, 6.75, ML, segment_number=1)],
    )
    directory = tmp_path_factory.mktemp("single")
    return build_case(directory, "single", ct_slices, prediction, context("job-single"))


@pytest.fixture(scope="module")
def findings_only(cxr: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """A radiograph classifier: one finding, no segments, so SR only."""
    prediction = Prediction(findings=[Finding(PNEUMOTHORAX, probability=0.12, threshold=0.4)])
    directory = tmp_path_factory.mktemp("cxr")
    ctx = context("job-cxr", name="cxr-ptx", version="2.1.0")
    return build_case(directory, "cxr", [cxr], prediction, ctx)


# --------------------------------------------------------------------------- common


def test_result_uids_are_deterministic_per_seed_and_kind() -> None:
    assert result_uids("seed", "SEG") == result_uids("seed", "SEG")
    assert result_uids("seed", "SEG") != result_uids("seed", "SR")
    assert result_uids("seed", "SEG") != result_uids("other", "SEG")
    series_uid, sop_uid = result_uids("seed", "SR")
    assert series_uid != sop_uid
    assert series_uid.is_valid and sop_uid.is_valid
    with pytest.raises(ValueError):
        result_uids("", "SR")
    with pytest.raises(ValueError):
        result_uids("seed", "CT")


def test_series_description() -> None:
    assert series_description("ct-lung", "1.0.0", "SEG") == "AI ct-lung 1.0.0 SEG"
    long = series_description("m" * 80, "1.0.0", "SR")
    assert len(long) == 64 and long.endswith(" SR")


def test_result_context_checks_its_fields() -> None:
    with pytest.raises(ValueError):
        ResultContext("ct-lung", "1.0.0", "0.1.0", uid_seed="")
    with pytest.raises(ValueError):
        ResultContext("", "1.0.0", "0.1.0", uid_seed="s")
    with pytest.raises(ValueError):
        ResultContext("ct-lung", "1.0.0", "0.1.0", uid_seed="s", uid_prefix="1.2.3")
    ctx = context("s")
    assert ctx.series_number("SEG") != ctx.series_number("SR")
    assert ctx.algorithm_id_version == "1.0.0+w.abc123"


def test_source_headers_fix_only_invalid_patient_study_values(
    ct_slices: list[Dataset], cxr: Dataset
) -> None:
    (ct_header,) = source_headers(ct_slices[:1])
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert ct_header.get(keyword) == ct_slices[0].get(keyword), keyword
    assert "PixelData" not in ct_header and "PixelData" in ct_slices[0]

    (cxr_header,) = source_headers([cxr])
    assert cxr.PatientAge == "81"  # invalid AS, the source is untouched
    assert cxr_header.PatientAge in (None, "")
    assert "StudyDate" not in cxr and cxr_header.StudyDate in (None, "")
    assert cxr_header.PatientName == cxr.PatientName


# --------------------------------------------------------------------------- SEG


def test_seg_passes_dciodvfy(lungs: Case) -> None:
    assert lungs.seg_path is not None
    assert dciodvfy(lungs.seg_path).errors == []


def test_seg_segments_codes_and_equipment(lungs: Case) -> None:
    assert lungs.seg_path is not None
    seg = hd.seg.segread(lungs.seg_path)
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesDescription == "AI ct-lung 1.0.0 SEG"
    assert seg.Manufacturer == "ainode"
    assert seg.ManufacturerModelName == "ct-lung"
    assert seg.SoftwareVersions == "0.1.0"
    assert seg.DeviceSerialNumber == "ainode"
    assert int(seg.SeriesNumber) == lungs.ctx.series_number("SEG")
    assert seg.get_segment_numbers() == [1, 2]
    for item, segment, side in zip(seg.SegmentSequence, lungs.prediction.segments,
                                   (RIGHT, LEFT), strict=True):
        assert item.SegmentLabel == segment.label
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert same_code(item.SegmentedPropertyCategoryCodeSequence[0], ANATOMY)
        type_item = item.SegmentedPropertyTypeCodeSequence[0]
        assert same_code(type_item, LUNG)
        assert same_code(type_item.SegmentedPropertyTypeModifierCodeSequence[0], side)
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "ct-lung"
        assert algorithm.AlgorithmVersion == "1.0.0+w.abc123"
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert family.CodeValue == codes.cid7162.ArtificialIntelligence.value
    assert seg.SegmentSequence[1].TrackingID == "lung-left"


def test_seg_frames_round_trip(lungs: Case) -> None:
    assert lungs.seg_path is not None
    seg = hd.seg.segread(lungs.seg_path)
    masks = [segment.mask for segment in lungs.prediction.segments]
    non_empty = sum(int(mask[z].any()) for mask in masks for z in range(mask.shape[0]))
    assert int(seg.NumberOfFrames) == non_empty  # empty frames are omitted
    uids = [ds.SOPInstanceUID for ds in lungs.sources]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    assert pixels.shape == (*masks[0].shape, 2)
    for index, mask in enumerate(masks):
        assert np.array_equal(pixels[..., index].astype(bool), mask)


def test_seg_carries_source_patient_and_study(lungs: Case) -> None:
    assert lungs.seg_path is not None
    seg = pydicom.dcmread(lungs.seg_path)
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert seg.get(keyword) == lungs.sources[0].get(keyword), keyword
    assert seg.FrameOfReferenceUID == lungs.sources[0].FrameOfReferenceUID


def test_single_segment_seg(single: Case) -> None:
    assert single.seg_path is not None
    assert dciodvfy(single.seg_path).errors == []
    seg = hd.seg.segread(single.seg_path)
    assert seg.get_segment_numbers() == [1]
    assert int(seg.NumberOfFrames) == 3
    assert seg.SegmentSequence[0].SegmentLabel == "Nodule"


def test_build_seg_without_segments_is_none(ct_slices: list[Dataset]) -> None:
    prediction = Prediction(findings=[Finding(NODULE, 0.2, 0.5)])
    assert build_seg(ct_slices, prediction, context("x")) is None


# --------------------------------------------------------------------------- SR


def test_sr_passes_dciodvfy_and_dsrdump(lungs: Case) -> None:
    assert dciodvfy(lungs.sr_path).errors == []
    dump = dsrdump(lungs.sr_path)
    assert "Imaging Measurement Report" in dump
    assert "not been verified by a radiologist" in dump


def test_sr_header(lungs: Case) -> None:
    sr = pydicom.dcmread(lungs.sr_path)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.Modality == "SR"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.SeriesDescription == "AI ct-lung 1.0.0 SR"
    assert sr.Manufacturer == "ainode"
    assert sr.SoftwareVersions == "0.1.0"
    assert int(sr.SeriesNumber) == lungs.ctx.series_number("SR")
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert sr.get(keyword) == lungs.sources[0].get(keyword), keyword


def test_sr_references_seg_segments_and_sources(lungs: Case) -> None:
    assert lungs.seg is not None and lungs.seg_path is not None
    seg = hd.seg.segread(lungs.seg_path)
    sr, report = read_report(lungs.sr_path)
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    source_uids = {ds.SOPInstanceUID for ds in lungs.sources}
    labels = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    for group, segment in zip(groups, lungs.prediction.segments, strict=True):
        referenced = group.referenced_segment
        assert referenced is not None
        assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert referenced.referenced_sop_class_uid == seg.SOPClassUID
        assert referenced.referenced_segment_numbers is not None
        number = referenced.referenced_segment_numbers[0]
        assert labels[number].SegmentLabel == segment.label
        assert group.tracking_uid == labels[number].TrackingUID
        images = referenced.source_images_for_segmentation
        assert {image.referenced_sop_instance_uid for image in images} == source_uids
    evidence = {uids[2] for uids in sr.get_evidence()}
    assert evidence == source_uids | {seg.SOPInstanceUID}


def test_listed_sources_are_in_the_image_library(lungs: Case) -> None:
    assert len(lungs.sources) <= MAX_LISTED_IMAGES  # the 30 slices are listed one by one
    sr = pydicom.dcmread(lungs.sr_path)
    (library,) = [i for i in sr.ContentSequence
                  if i.ConceptNameCodeSequence[0].CodeValue == "111028"]  # Image Library
    (group,) = library.ContentSequence
    entries = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
    assert [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries] == [
        ds.SOPInstanceUID for ds in lungs.sources]


def test_sr_segment_groups_round_trip(lungs: Case) -> None:
    _, report = read_report(lungs.sr_path)
    groups = report.get_volumetric_roi_measurement_groups()
    for group, segment, side in zip(groups, lungs.prediction.segments, (RIGHT, LEFT),
                                    strict=True):
        assert group.finding_type is not None and same_code(group.finding_type, LUNG)
        assert group.finding_category is not None and same_code(group.finding_category, ANATOMY)
        (site,) = group.finding_sites
        assert same_code(site.value, LUNG)
        assert site.laterality is not None and same_code(site.laterality, side)
        expected = [m for m in lungs.prediction.measurements if m.segment_number == segment.number]
        got = group.get_measurements()
        assert len(got) == len(expected)
        for measurement, want in zip(got, expected, strict=True):
            assert same_code(measurement.name, want.name)
            assert same_code(measurement.unit, want.unit)
            assert measurement.value == pytest.approx(want.value, rel=1e-12)
            if want.derivation is None:
                assert measurement.derivation is None
            else:
                assert measurement.derivation is not None
                assert same_code(measurement.derivation, want.derivation)


def test_sr_study_measurements_and_findings(lungs: Case) -> None:
    _, report = read_report(lungs.sr_path)
    study_group, finding_group = report.get_image_measurement_groups()
    source_uids = {ds.SOPInstanceUID for ds in lungs.sources}

    (fraction,) = study_group.get_measurements()
    assert same_code(fraction.name, CALCIFIED_PERCENT)
    assert same_code(fraction.unit, PERCENT)
    assert fraction.value == pytest.approx(12.5)
    assert {i.referenced_sop_instance_uid for i in study_group.source_images} == source_uids

    (evaluation,) = finding_group.get_qualitative_evaluations()
    assert same_code(evaluation.name, NODULE)
    assert evaluation_value(evaluation) == "52101004"  # Present: 0.87 >= 0.5
    probability, threshold = finding_group.get_measurements()
    assert probability.name.value == "111012"  # Certainty of Finding
    assert probability.value == pytest.approx(0.87)
    assert threshold.name.value == "122411"  # Threshold Value
    assert threshold.value == pytest.approx(0.5)
    assert probability.unit.value == threshold.unit.value == "1"
    assert {i.referenced_sop_instance_uid for i in finding_group.source_images} == source_uids


def test_sr_observer_procedure_and_disclaimer(lungs: Case) -> None:
    sr, report = read_report(lungs.sr_path)
    (observer,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = observer.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.name == "ct-lung"
    assert attributes.model_name == "ct-lung 1.0.0"
    assert attributes.manufacturer_name == "ainode"
    root = sr.ContentSequence
    procedures = [i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert [p.ConceptCodeSequence[0].CodeValue for p in procedures] == ["169069000"]
    (container,) = [i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert "not been verified by a radiologist" in container.ContentSequence[0].TextValue


def test_single_segment_sr(single: Case) -> None:
    assert single.seg is not None
    assert dciodvfy(single.sr_path).errors == []
    dsrdump(single.sr_path)
    _, report = read_report(single.sr_path)
    (group,) = report.get_volumetric_roi_measurement_groups()
    referenced = group.referenced_segment
    assert referenced is not None
    assert referenced.referenced_sop_instance_uid == single.seg.SOPInstanceUID
    assert referenced.referenced_segment_numbers == [1]
    assert group.finding_sites == []  # a nodule is not an anatomic location
    (volume,) = group.get_measurements()
    assert volume.value == pytest.approx(6.75)


def test_findings_only_sr_from_radiograph(findings_only: Case, cxr: Dataset) -> None:
    assert findings_only.seg is None and findings_only.seg_path is None
    assert dciodvfy(findings_only.sr_path).errors == []
    dsrdump(findings_only.sr_path)
    sr, report = read_report(findings_only.sr_path)
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.SeriesDescription == "AI cxr-ptx 2.1.0 SR"
    for keyword in ("PatientName", "PatientID", "PatientSex", "StudyInstanceUID",
                    "StudyDescription"):
        assert sr.get(keyword) == cxr.get(keyword), keyword
    assert sr.PatientAge in (None, "")  # the source's "81" is not a valid AS
    assert report.get_volumetric_roi_measurement_groups() == []
    (group,) = report.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert same_code(evaluation.name, PNEUMOTHORAX)
    assert evaluation_value(evaluation) == "2667000"  # Absent: 0.12 < 0.4
    assert [i.referenced_sop_instance_uid for i in group.source_images] == [cxr.SOPInstanceUID]
    assert {uids[2] for uids in sr.get_evidence()} == {cxr.SOPInstanceUID}
    procedure = procedure_item(sr)
    assert procedure.ConceptCodeSequence[0].CodeValue == "43468-8"  # no BodyPartExamined


def test_explicit_procedure_wins(cxr: Dataset) -> None:
    chest_xray = Code("399208008", "SCT", "Plain X-ray of chest")
    ctx = ResultContext("cxr-ptx", "2.1.0", "0.1.0", uid_seed="p", procedure=chest_xray)
    sr = build_sr([cxr], Prediction(findings=[Finding(PNEUMOTHORAX, 0.9, 0.4)]), ctx, None)
    procedure = procedure_item(sr)
    assert same_code(procedure.ConceptCodeSequence[0], chest_xray)


# --------------------------------------------------------------------------- UIDs


def test_same_seed_gives_same_uids(single: Case, findings_only: Case) -> None:
    again = build_seg(single.sources, single.prediction, single.ctx)
    assert again is not None and single.seg is not None
    assert again.SeriesInstanceUID == single.seg.SeriesInstanceUID
    assert again.SOPInstanceUID == single.seg.SOPInstanceUID
    sr_again = build_sr(findings_only.sources, findings_only.prediction, findings_only.ctx, None)
    assert sr_again.SeriesInstanceUID == findings_only.sr.SeriesInstanceUID
    assert sr_again.SOPInstanceUID == findings_only.sr.SOPInstanceUID
    assert single.seg.SOPInstanceUID != single.sr.SOPInstanceUID
    assert single.seg.SeriesInstanceUID != single.sr.SeriesInstanceUID


def test_other_seed_gives_other_uids(single: Case, findings_only: Case) -> None:
    ctx = context("another-job")
    other = build_seg(single.sources, single.prediction, ctx)
    assert other is not None and single.seg is not None
    assert other.SeriesInstanceUID != single.seg.SeriesInstanceUID
    assert other.SOPInstanceUID != single.seg.SOPInstanceUID
    sr_other = build_sr(findings_only.sources, findings_only.prediction, ctx, None)
    assert sr_other.SeriesInstanceUID != findings_only.sr.SeriesInstanceUID
    assert sr_other.SOPInstanceUID != findings_only.sr.SOPInstanceUID


# --------------------------------------------------------------------------- edge cases


def test_source_without_body_part_still_validates(
    ct_slices: list[Dataset], tmp_path: Path
) -> None:
    sources = [copy.deepcopy(ds) for ds in ct_slices[8:14]]
    for ds in sources:
        del ds.BodyPartExamined
    shape = ct_shape(sources)
    prediction = Prediction(
        segments=[Segment(1, "Right lung", ANATOMY, LUNG,
                          box(shape, slice(0, 6), slice(150, 350), slice(80, 230)),
                          type_modifier=RIGHT)],
        measurements=[Measurement(VOLUME, 420.0, ML, segment_number=1)],
    )
    case = build_case(tmp_path, "nobodypart", sources, prediction, context("nbp"))
    assert case.seg_path is not None
    assert dciodvfy(case.seg_path).errors == []
    assert dciodvfy(case.sr_path).errors == []
    procedure = procedure_item(case.sr)
    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"  # CT, body part unknown


def test_segments_are_renumbered_from_one(ct_slices: list[Dataset], tmp_path: Path) -> None:
    sources = ct_slices[10:13]
    shape = ct_shape(sources)
    prediction = Prediction(
        segments=[
            Segment(7, "Left lung", ANATOMY, LUNG,
                    box(shape, slice(0, 3), slice(150, 350), slice(280, 430)), LEFT),
            Segment(3, "Right lung", ANATOMY, LUNG,
                    box(shape, slice(0, 3), slice(150, 350), slice(80, 230)), RIGHT),
        ],
        measurements=[Measurement(VOLUME, 70.0, ML, segment_number=7),
                      Measurement(VOLUME, 80.0, ML, segment_number=3)],
    )
    case = build_case(tmp_path, "renumbered", sources, prediction, context("renum"))
    assert case.seg is not None
    assert [item.SegmentLabel for item in case.seg.SegmentSequence] == ["Right lung", "Left lung"]
    _, report = read_report(case.sr_path)
    found = {}
    for group in report.get_volumetric_roi_measurement_groups():
        assert group.referenced_segment is not None
        numbers = group.referenced_segment.referenced_segment_numbers
        assert numbers is not None
        (number,) = numbers
        found[number] = group.get_measurements()[0].value
    assert found == {1: pytest.approx(80.0), 2: pytest.approx(70.0)}
    assert dciodvfy(case.sr_path).errors == []


def test_input_is_checked(ct_slices: list[Dataset], findings_only: Case) -> None:
    sources = ct_slices[:2]
    shape = ct_shape(sources)
    good = Segment(1, "Right lung", ANATOMY, LUNG,
                   box(shape, slice(0, 1), slice(0, 9), slice(0, 9)))
    ctx = context("checks")
    with pytest.raises(ValueError, match="mask shape"):
        bad = Segment(1, "Right lung", ANATOMY, LUNG, np.zeros((3, 4, 5), dtype=bool))
        build_seg(sources, Prediction(segments=[bad]), ctx)
    with pytest.raises(TypeError, match="bool"):
        wrong = Segment(1, "Right lung", ANATOMY, LUNG, np.zeros(shape, dtype=np.uint8))
        build_seg(sources, Prediction(segments=[wrong]), ctx)
    with pytest.raises(ValueError, match="no source"):
        build_seg([], Prediction(segments=[good]), ctx)
    with pytest.raises(ValueError, match="no SEG"):
        build_sr(sources, Prediction(segments=[good]), ctx, None)
    with pytest.raises(ValueError, match="no segments, measurements or findings"):
        build_sr(sources, Prediction(), ctx, None)
    with pytest.raises(ValueError, match="unknown segment"):
        build_sr(sources, Prediction(measurements=[Measurement(VOLUME, 1.0, ML, 4)]), ctx, None)
    with pytest.raises(ValueError, match="probability"):
        build_sr(sources, Prediction(findings=[Finding(NODULE, 1.5, 0.5)]), ctx, None)
    with pytest.raises(ValueError, match="studies"):
        build_sr([*sources, findings_only.sources[0]],
                 Prediction(findings=[Finding(NODULE, 0.5, 0.5)]), ctx, None)


def test_sr_rejects_a_seg_of_another_prediction(single: Case) -> None:
    other = Segment(1, "Liver", ANATOMY, Code("10200004", "SCT", "Liver"),
                    single.prediction.segments[0].mask)
    with pytest.raises(ValueError, match="not the SEG of this prediction"):
        build_sr(single.sources, Prediction(segments=[other]), single.ctx, single.seg)


def test_multiframe_source(tmp_path: Path) -> None:
    """One Legacy Converted Enhanced CT (30 frames): the mask's first axis is its frames."""
    path = SAMPLES / "derived" / "chest-ct-A0002_LegacyConvertedEnhancedCT_30frames.dcm"
    source = pydicom.dcmread(path)
    shape = (int(source.NumberOfFrames), int(source.Rows), int(source.Columns))
    prediction = Prediction(
        segments=[Segment(1, "Right lung", ANATOMY, LUNG,
                          box(shape, slice(5, 20), slice(150, 350), slice(80, 230)), RIGHT)],
        measurements=[Measurement(VOLUME, 1234.5, ML, segment_number=1)],
    )
    case = build_case(tmp_path, "multiframe", [source], prediction, context("mf"))
    assert case.seg is not None and case.seg_path is not None
    assert int(case.seg.NumberOfFrames) == 15
    assert dciodvfy(case.seg_path).errors == []
    assert dciodvfy(case.sr_path).errors == []
    _, report = read_report(case.sr_path)
    (group,) = report.get_volumetric_roi_measurement_groups()
    assert group.get_measurements()[0].value == pytest.approx(1234.5)


def test_overlapping_segments_round_trip(ct_slices: list[Dataset], tmp_path: Path) -> None:
    """Overlapping masks cannot be one label map: they go to highdicom stacked."""
    sources = ct_slices[10:16]
    shape = ct_shape(sources)
    lung = box(shape, slice(0, 6), slice(150, 350), slice(80, 230))
    nodule = box(shape, slice(2, 4), slice(200, 230), slice(120, 150))  # inside the lung
    assert segment_pixels([lung, nodule]).shape == (*shape, 2)
    prediction = Prediction(segments=[
        Segment(1, "Right lung", ANATOMY, LUNG, lung, type_modifier=RIGHT),
        Segment(2, "Nodule", Code("49755003", "SCT", "Morphologically Abnormal Structure"),
                NODULE, nodule),
    ])
    case = build_case(tmp_path, "overlap", sources, prediction, context("overlap"))
    assert case.seg_path is not None
    assert dciodvfy(case.seg_path).errors == []
    seg = hd.seg.segread(case.seg_path)
    assert seg.SegmentsOverlap == "YES"
    assert int(seg.NumberOfFrames) == 6 + 2
    pixels = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in sources], segment_numbers=[1, 2]
    )
    assert np.array_equal(pixels[..., 0].astype(bool), lung)
    assert np.array_equal(pixels[..., 1].astype(bool), nodule)


def test_disjoint_segments_become_a_label_map() -> None:
    shape = (3, 8, 8)
    first = box(shape, slice(0, 2), slice(0, 4), slice(0, 4))
    second = box(shape, slice(1, 3), slice(4, 8), slice(4, 8))
    labels = segment_pixels([first, second])
    assert labels.shape == shape and labels.dtype == np.uint8
    assert np.array_equal(labels == 1, first) and np.array_equal(labels == 2, second)
    assert not labels[2, :4, :4].any()


def test_source_headers_share_nothing_mutable(ct_slices: list[Dataset]) -> None:
    source = copy.deepcopy(ct_slices[0])
    (header,) = source_headers([source])
    assert header.SOPInstanceUID == source.SOPInstanceUID
    assert header.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    sequences = [elem.keyword for elem in header if elem.VR == "SQ"]
    assert sequences  # the sample has sequences: check they are copies
    for keyword in sequences:
        assert header[keyword].value is not source[keyword].value
        for item, original in zip(header[keyword].value, source[keyword].value, strict=True):
            assert item is not original
            assert item == original
    header.ImageType = ["DERIVED"]
    header.PatientID = "changed"
    assert source.PatientID != "changed" and source.ImageType[0] == "ORIGINAL"


# --------------------------------------------------------------------------- 300 slices


@pytest.fixture(scope="module")
def ct300(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The sample CT resampled to 300 slices (as the turnaround benchmark does): both lungs,
    their volumes, a study measurement and a finding."""
    from node.bench.turnaround import thin_ct  # imports torch: only when this fixture runs
    from node.infer.volume import build_volume

    directory = tmp_path_factory.mktemp("ct300")
    files = thin_ct(CT_DIR, directory / "slices", 300)
    series = build_volume([pydicom.dcmread(path) for path in files])
    shape = series.volume.array.shape
    assert shape[0] == 300
    prediction = Prediction(
        segments=[
            Segment(1, "Right lung", ANATOMY, LUNG,
                    box(shape, slice(50, 250), slice(100, 300), slice(100, 250)),
                    type_modifier=RIGHT),
            Segment(2, "Left lung", ANATOMY, LUNG,
                    box(shape, slice(50, 250), slice(100, 300), slice(260, 400)),
                    type_modifier=LEFT),
        ],
        measurements=[
            Measurement(VOLUME, 2345.678, ML, segment_number=1),
            Measurement(VOLUME, 2101.25, ML, segment_number=2),
            Measurement(CALCIFIED_PERCENT, 12.5, PERCENT, segment_number=None),
        ],
        findings=[Finding(NODULE, probability=0.87, threshold=0.5)],
    )
    return build_case(directory, "ct300", series.sources, prediction, context("job-ct300"))


def test_300_slice_seg_and_sr_validate_and_read_back(ct300: Case) -> None:
    assert ct300.seg_path is not None
    assert dciodvfy(ct300.seg_path).errors == []
    assert dciodvfy(ct300.sr_path).errors == []
    dsrdump(ct300.sr_path)

    seg = hd.seg.segread(ct300.seg_path)
    assert seg.get_segment_numbers() == [1, 2]
    assert seg.SegmentsOverlap == "NO"
    assert int(seg.NumberOfFrames) == 2 * 200  # 200 slices per lung, empty frames left out
    uids = [ds.SOPInstanceUID for ds in ct300.sources]
    seg_refs = {ref.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                for ref in series.ReferencedInstanceSequence}
    assert seg_refs == set(uids)
    pixels = seg.get_pixels_by_source_instance(uids[45:55], segment_numbers=[1, 2])
    for index, segment in enumerate(ct300.prediction.segments):
        assert np.array_equal(pixels[..., index].astype(bool), segment.mask[45:55])


def test_300_slice_sr_references_the_series(ct300: Case) -> None:
    assert ct300.seg is not None
    sources = ct300.sources
    series_uid = sources[0].SeriesInstanceUID
    sr, report = read_report(ct300.sr_path)
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert sr.get(keyword) == sources[0].get(keyword), keyword

    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for number, group in enumerate(groups, start=1):
        referenced = group.referenced_segment
        assert referenced is not None
        assert referenced.referenced_sop_instance_uid == ct300.seg.SOPInstanceUID
        assert referenced.referenced_segment_numbers == [number]
        assert group.tracking_uid == ct300.seg.SegmentSequence[number - 1].TrackingUID
        assert referenced.source_images_for_segmentation == []
        series = referenced.source_series_for_segmentation
        assert series is not None and series.value == series_uid
        (volume,) = group.get_measurements()
        assert volume.value == pytest.approx(ct300.prediction.measurements[number - 1].value)

    study_group, finding_group = report.get_image_measurement_groups()
    assert study_group.get_measurements()[0].value == pytest.approx(12.5)
    assert study_group.source_images == [] and finding_group.source_images == []
    assert evaluation_value(finding_group.get_qualitative_evaluations()[0]) == "52101004"

    assert len(sources) > MAX_LISTED_IMAGES
    root = sr.ContentSequence
    assert not [i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    evidence = {uids[2] for uids in sr.get_evidence()}
    assert evidence == {ds.SOPInstanceUID for ds in sources} | {ct300.seg.SOPInstanceUID}


@pytest.mark.parametrize(("modality", "body_part", "expected"), [
    ("CT", "CHEST", ("169069000", "SCT", "Computed tomography of chest")),
    ("CT", "", ("25045-6", "LN", "CT unspecified body region")),
    ("DX", "LUNG", ("399208008", "SCT", "Plain X-ray of chest")),
    ("CR", "", ("43468-8", "LN", "XR unspecified body region")),
    ("MR", "", ("25056-3", "LN", "MRI unspecified body region")),
    ("PT", "", ("44136-0", "LN", "PET unspecified body region")),
    ("NM", "", ("49118-3", "LN", "NM unspecified body region")),
    ("US", "", ("363679005", "SCT", "Imaging procedure")),
])
def test_procedure_reported_codes(modality: str, body_part: str,
                                  expected: tuple[str, str, str]) -> None:
    source = Dataset()
    source.Modality = modality
    source.BodyPartExamined = body_part
    ctx = ResultContext(model_name="m", model_version="1", software_version="1", uid_seed="s")
    concept = procedure_code(source, ctx)
    assert (concept.value, concept.scheme_designator, concept.meaning) == expected


def test_coded_takes_model_and_codedict_codes() -> None:
    assert coded(codes.DCM.Comment) == coded(Code("121106", "DCM", "Comment"))
    with pytest.raises(TypeError):
        coded(("121106", "DCM", "Comment"))  # type: ignore[arg-type]

