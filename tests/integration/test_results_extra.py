"""Heatmap SEG (FRACTIONAL) and secondary-capture "AI result" images from the real samples.

Every object is written to a file, checked with dicom3tools ``dciodvfy`` (zero
errors) and read back (highdicom ``segread`` for the SEG, pydicom for the SC
images). Two rendered SC images are also written as PNG (``/tmp/ainode-sc-ct.png``,
``/tmp/ainode-sc-cxr.png``) for a person to look at.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage
from scipy import ndimage

from models.base import Code, Finding, Heatmap, Measurement, Prediction, Segment, Volume
from node.errors import ConfigError
from node.infer.radiograph import radiograph_to_volume
from node.infer.volume import build_volume
from node.results.common import (
    DEFAULT_UID_PREFIX,
    ResultContext,
    ResultKind,
    derive_uid,
    result_instance_uid,
    result_uids,
    series_description,
    source_headers,
)
from node.results.heatmap import CONTENT_LABEL, HEATMAP_CATEGORY, build_heatmap_seg
from node.results.sc import (
    BANNER_COLOUR,
    LEGEND_BACKGROUND,
    MAX_LONG_SIDE,
    build_sc,
    key_slices,
    segment_colour,
)
from node.results.selection import (
    DEFAULT_KINDS,
    ResultObject,
    build_results,
    destination_kinds,
    kinds_by_destination,
    wanted_kinds,
    with_requirements,
)
from node.settings import Settings, parse_settings
from tests.integration.test_results import (
    ANATOMY,
    ATTENUATION,
    HU,
    LEFT,
    LUNG,
    MEAN,
    ML,
    NODULE,
    PATIENT_STUDY_KEYWORDS,
    RIGHT,
    VOLUME,
)
from tests.peers import dciodvfy

SAMPLES = Path("/work/shared/dicom-samples")
CT_DIR = SAMPLES / "chest-ct-lung-pet-ct-dx-a0002"
CXR_DIR = SAMPLES / "chest-xray"
MULTIFRAME_CT = SAMPLES / "derived" / "chest-ct-A0002_LegacyConvertedEnhancedCT_30frames.dcm"
RADIOGRAPHS = (
    "RG1_J2KI.dcm",  # CR, JPEG 2000, MONOCHROME1, PixelSpacing 0\0
    "DX_chest_PA_Canon_966_fixed.dcm",  # DX, JPEG 2000 lossless, MONOCHROME1
    "NIH_CXR14_SC_Covid0000.dcm",  # 8-bit secondary capture, minimal header
)

PNEUMONIA = Code("233604007", "SCT", "Pneumonia")

PNG_CT = Path("/tmp/ainode-sc-ct.png")
PNG_CXR = Path("/tmp/ainode-sc-cxr.png")


Rgb = tuple[int, int, int]


# --------------------------------------------------------------------------- helpers


def read_source(path: Path) -> Dataset:
    """Read a sample and convert every element once, silencing pydicom's invalid-value warnings.

    The samples carry invalid values (e.g. a 56-character Accession Number); pydicom
    warns when an element is first converted, which pytest turns into an error.
    """
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in ds.iterall():
            pass
    return ds


def context(seed: str, name: str = "ct-lung", version: str = "1.0.0") -> ResultContext:
    return ResultContext(
        model_name=name,
        model_version=version,
        algorithm_version=f"{version}+w.abc123",
        software_version="0.1.0",
        uid_seed=seed,
    )


def gaussian(shape: tuple[int, int], centre: tuple[float, float], sigma: float
             ) -> npt.NDArray[np.float32]:
    """A 2-D Gaussian blob with peak 1 at ``centre`` (row, column)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    d2 = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2
    blob: npt.NDArray[np.float32] = np.exp(-d2 / (2.0 * sigma**2)).astype(np.float32)
    return blob


def border(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image edge counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
             & padded[1:-1, :-2] & padded[1:-1, 2:])
    out: npt.NDArray[np.bool_] = mask & ~inner
    return out


def grow(mask: npt.NDArray[np.bool_], pixels: int) -> npt.NDArray[np.bool_]:
    """``mask`` dilated by ``pixels`` (8-neighbour steps)."""
    out = mask.copy()
    for _ in range(pixels):
        padded = np.pad(out, 1, constant_values=False)
        out = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def is_colour(pixels: npt.NDArray[np.uint8], colour: Rgb) -> npt.NDArray[np.bool_]:
    out: npt.NDArray[np.bool_] = np.all(pixels == np.asarray(colour, dtype=np.uint8), axis=-1)
    return out


def banner_height(pixels: npt.NDArray[np.uint8]) -> int:
    """Rows from the top in which most pixels have the banner colour."""
    fraction = is_colour(pixels, BANNER_COLOUR).mean(axis=1)
    height = 0
    while height < pixels.shape[0] and fraction[height] > 0.5:
        height += 1
    return height


def legend_top(pixels: npt.NDArray[np.uint8]) -> int:
    """First row below the banner in which most pixels have the legend's background colour."""
    fraction = is_colour(pixels, LEGEND_BACKGROUND).mean(axis=1)
    rows = np.flatnonzero(fraction[banner_height(pixels) :] > 0.5)
    assert rows.size, "no legend band"
    return banner_height(pixels) + int(rows[0])


def check_patient_study(result: Dataset, source: Dataset) -> None:
    """Patient/study attributes of ``result`` equal the source's (as ``source_headers`` keeps)."""
    (header,) = source_headers([source])
    for keyword in PATIENT_STUDY_KEYWORDS:
        expected, got = header.get(keyword), result.get(keyword)
        if expected in (None, ""):
            assert got in (None, ""), keyword
        else:
            assert got == expected, keyword
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID"):
        assert result.get(keyword) == source.get(keyword), keyword


def check_sc_basics(sc: Dataset, ctx: ResultContext, number: int) -> npt.NDArray[np.uint8]:
    """The attributes every SC image has; returns its pixels (rows, cols, 3)."""
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.Modality == "OT"
    assert sc.ConversionType == "WSD"
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB"
    assert (sc.SamplesPerPixel, sc.BitsAllocated, sc.BitsStored) == (3, 8, 8)
    assert int(sc.InstanceNumber) == number
    series_uid, _ = ctx.uids(ResultKind.SC)
    assert sc.SeriesInstanceUID == series_uid
    assert sc.SOPInstanceUID == ctx.instance_uid(ResultKind.SC, number)
    assert int(sc.SeriesNumber) == ctx.series_number(ResultKind.SC)
    assert sc.SeriesDescription == f"AI {ctx.model_name} {ctx.model_version} SC"
    pixels: npt.NDArray[np.uint8] = sc.pixel_array
    assert pixels.shape == (sc.Rows, sc.Columns, 3) and pixels.dtype == np.uint8
    height = banner_height(pixels)
    assert 20 <= height <= 120, height
    banner = pixels[:height]
    assert is_colour(banner, (255, 255, 255)).any()  # the banner's text
    return pixels


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ct_slices() -> list[Dataset]:
    """The 30-slice chest CT, in volume order (increasing z)."""
    if not CT_DIR.is_dir():
        pytest.skip(f"{CT_DIR} not available")
    slices = [read_source(path) for path in sorted(CT_DIR.glob("*.dcm"))]
    assert len(slices) == 30
    return sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def ct_volume(ct_slices: list[Dataset]) -> Volume:
    series = build_volume(ct_slices)
    assert [ds.SOPInstanceUID for ds in series.sources] == [
        ds.SOPInstanceUID for ds in ct_slices
    ]
    return series.volume


@pytest.fixture(scope="module")
def radiographs() -> dict[str, Dataset]:
    if not CXR_DIR.is_dir():
        pytest.skip(f"{CXR_DIR} not available")
    return {name: read_source(CXR_DIR / name) for name in RADIOGRAPHS}


def lung_masks(volume: Volume) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Synthetic right/left lungs: air inside the body, split at the midline with a gap.

    The body is what lies between the first and last pixel above -500 HU in both
    its row and its column, which leaves the air around the patient out.
    """
    hu = volume.array
    tissue = hu > -500
    cols = np.arange(hu.shape[2])
    rows = np.arange(hu.shape[1])
    any_row = tissue.any(axis=2, keepdims=True)
    any_col = tissue.any(axis=1, keepdims=True)
    first_c = np.where(any_row, np.argmax(tissue, axis=2)[..., None], hu.shape[2])
    last_c = np.where(any_row, hu.shape[2] - 1 - np.argmax(tissue[..., ::-1], axis=2)[..., None],
                      -1)
    first_r = np.where(any_col, np.argmax(tissue, axis=1)[:, None, :], hu.shape[1])
    last_r = np.where(any_col, hu.shape[1] - 1 - np.argmax(tissue[:, ::-1, :], axis=1)[:, None, :],
                      -1)
    inside = ((cols[None, None, :] > first_c) & (cols[None, None, :] < last_c)
              & (rows[None, :, None] > first_r) & (rows[None, :, None] < last_r))
    air = (hu < -400) & inside
    air[:, :, 246:266] = False
    air[:, 395:, :] = False  # the air between the back and the table
    right, left = air.copy(), air.copy()
    right[:, :, 256:] = False
    left[:, :, :256] = False
    right[:4] = False  # the lungs start a few slices up: the extent is not the whole volume
    left[:4] = False
    return largest_component(right), largest_component(left)


def largest_component(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The largest 3-D connected part of ``mask`` (drops stray air pockets)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    out: npt.NDArray[np.bool_] = labels == int(np.argmax(sizes)) + 1
    return out


@pytest.fixture(scope="module")
def ct_prediction(ct_volume: Volume) -> Prediction:
    right, left = lung_masks(ct_volume)
    shape = ct_volume.array.shape
    heat = np.zeros(shape, dtype=np.float32)
    heat[12:18] = gaussian(shape[1:], (300.0, 170.0), 30.0)
    return Prediction(
        segments=[
            Segment(1, "Right lung", ANATOMY, LUNG, right, type_modifier=RIGHT),
            Segment(2, "Left lung", ANATOMY, LUNG, left, type_modifier=LEFT),
        ],
        measurements=[
            Measurement(VOLUME, 2345.678, ML, segment_number=1),
            Measurement(ATTENUATION, -812.5, HU, segment_number=1, derivation=MEAN),
            Measurement(VOLUME, 2101.25, ML, segment_number=2),
            Measurement(ATTENUATION, -830.75, HU, segment_number=2, derivation=MEAN),
        ],
        findings=[Finding(NODULE, probability=0.87, threshold=0.5)],
        heatmaps=[Heatmap(NODULE, heat)],
    )


@dataclass(frozen=True)
class ScCase:
    """The SC images of one job, written to files and read back."""

    ctx: ResultContext
    built: list[Dataset]
    paths: list[Path]
    read: list[Dataset]


def write_all(directory: Path, name: str, datasets: Sequence[Dataset]) -> list[Path]:
    paths = []
    for number, ds in enumerate(datasets, start=1):
        path = directory / f"{name}-{number}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def ct_sc(ct_slices: list[Dataset], ct_volume: Volume, ct_prediction: Prediction,
          tmp_path_factory: pytest.TempPathFactory) -> ScCase:
    ctx = context("job-ct-sc")
    built = build_sc(ct_slices, ct_volume, ct_prediction, ctx)
    paths = write_all(tmp_path_factory.mktemp("ct-sc"), "ct-sc", built)
    return ScCase(ctx, built, paths, [pydicom.dcmread(path) for path in paths])


@pytest.fixture(scope="module")
def cxr_heatmaps(radiographs: dict[str, Dataset]) -> dict[str, tuple[Volume, Prediction]]:
    """Per radiograph: its display volume and a prediction with a Gaussian heatmap."""
    out = {}
    for name, ds in radiographs.items():
        volume = radiograph_to_volume(ds)
        rows, cols = volume.array.shape[1:]
        blob = gaussian((rows, cols), (rows * 0.55, cols * 0.3), rows / 10.0)
        blob[blob < 0.02] = 0.0  # present only where the model looked
        prediction = Prediction(
            findings=[Finding(PNEUMONIA, probability=0.91, threshold=0.5)],
            heatmaps=[Heatmap(PNEUMONIA, blob[np.newaxis])],
        )
        out[name] = (volume, prediction)
    return out


# --------------------------------------------------------------------------- common


def test_result_kinds_keep_seg_and_sr_and_add_heatmap_and_sc() -> None:
    assert [kind.value for kind in ResultKind] == ["SEG", "SR", "HEATMAP", "SC"]
    assert [kind.modality for kind in ResultKind] == ["SEG", "SR", "SEG", "OT"]
    offsets = [kind.series_offset for kind in ResultKind]
    assert offsets[:2] == [1, 2] and len(set(offsets)) == len(offsets)
    assert series_description("cxr-pneumonia", "1.0.0", "HEATMAP") == (
        "AI cxr-pneumonia 1.0.0 HEATMAP"
    )
    assert series_description("ct-lung", "1.0.0", ResultKind.SC) == "AI ct-lung 1.0.0 SC"
    ctx = context("kinds")
    assert len({ctx.series_number(kind) for kind in ResultKind}) == 4


def test_uids_per_kind_and_image_index() -> None:
    # SEG and SR UIDs are derived exactly as before HEATMAP and SC existed.
    for kind in ("SEG", "SR"):
        series_uid, sop_uid = result_uids("seed", kind)
        assert series_uid == derive_uid(DEFAULT_UID_PREFIX, "ainode-result", "seed", kind,
                                        "series")
        assert sop_uid == derive_uid(DEFAULT_UID_PREFIX, "ainode-result", "seed", kind,
                                     "instance")
    every = {uid for kind in ResultKind for uid in result_uids("seed", kind)}
    assert len(every) == 8
    ctx = context("seed")
    assert ctx.instance_uid(ResultKind.SC, 1) == ctx.uids(ResultKind.SC)[1]
    images = [ctx.instance_uid(ResultKind.SC, n) for n in range(1, 6)]
    assert len(set(images)) == 5 and all(uid.is_valid for uid in images)
    assert images == [result_instance_uid("seed", "SC", n) for n in range(1, 6)]
    assert ctx.instance_uid("SC", 2) != context("other").instance_uid("SC", 2)
    for bad in (0, -1, True):
        with pytest.raises(ValueError):
            ctx.instance_uid(ResultKind.SC, bad)


def test_key_slices_are_spread_over_the_extent() -> None:
    weights = np.zeros(40)
    weights[10:31] = np.arange(21) + 1.0  # grows towards the top
    picks = key_slices(weights, 3)
    assert len(picks) == 3 and picks == sorted(picks)
    assert all(10 <= p <= 30 for p in picks)
    assert min(np.diff(picks)) >= 3
    assert key_slices(np.zeros(9), 3) == [4]
    one = np.zeros(9)
    one[2] = 5.0
    assert key_slices(one, 3) == [2]


# --------------------------------------------------------------------------- heatmap SEG


@pytest.mark.parametrize("name", RADIOGRAPHS)
def test_heatmap_seg_of_radiograph(
    name: str, radiographs: dict[str, Dataset],
    cxr_heatmaps: dict[str, tuple[Volume, Prediction]], tmp_path: Path,
) -> None:
    source = radiographs[name]
    _, prediction = cxr_heatmaps[name]
    ctx = context("job-cxr-" + name, name="cxr-pneumonia")
    seg = build_heatmap_seg([source], prediction, ctx)
    assert seg is not None
    path = tmp_path / "heatmap.dcm"
    seg.save_as(path)
    assert dciodvfy(path).errors == []

    back = hd.seg.segread(path)
    assert back.SOPClassUID == SegmentationStorage and back.Modality == "SEG"
    assert back.SegmentationType == "FRACTIONAL"
    assert back.SegmentationFractionalType == "PROBABILITY"
    assert int(back.MaximumFractionalValue) == 255
    assert back.ContentLabel == CONTENT_LABEL
    assert "class activation map" in back.ContentDescription.lower()
    assert back.SeriesDescription == "AI cxr-pneumonia 1.0.0 HEATMAP"
    assert (back.SeriesInstanceUID, back.SOPInstanceUID) == ctx.uids(ResultKind.HEATMAP)
    assert int(back.SeriesNumber) == ctx.series_number(ResultKind.HEATMAP)
    (item,) = back.SegmentSequence
    category = item.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator, category.CodeMeaning) == (
        "49755003", "SCT", "Morphologically Abnormal Structure")
    assert (HEATMAP_CATEGORY.value, HEATMAP_CATEGORY.scheme_designator) == ("49755003", "SCT")
    kind = item.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == (
        PNEUMONIA.value, PNEUMONIA.scheme, PNEUMONIA.meaning)
    assert item.SegmentLabel == "Class activation map: Pneumonia"
    assert "not a segmentation" in item.SegmentDescription
    algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
        "cxr-pneumonia", "1.0.0+w.abc123")
    check_patient_study(back, source)

    values = back.get_pixels_by_source_instance(
        [source.SOPInstanceUID], segment_numbers=[1], rescale_fractional=True
    )
    expected = prediction.heatmaps[0].array
    assert values.shape == (*expected.shape, 1)
    assert np.max(np.abs(values[..., 0] - expected)) <= 1.0 / 255.0 + 1e-6


def test_heatmap_seg_of_ct(ct_slices: list[Dataset], ct_prediction: Prediction,
                           tmp_path: Path) -> None:
    shape = ct_prediction.heatmaps[0].array.shape
    second = np.zeros(shape, dtype=np.float32)
    second[20:23] = 0.5 * gaussian(shape[1:], (200.0, 350.0), 20.0)
    prediction = Prediction(heatmaps=[*ct_prediction.heatmaps,
                                      Heatmap(LUNG, second, label="Grad-CAM")])
    ctx = context("job-ct-heatmap")
    seg = build_heatmap_seg(ct_slices, prediction, ctx)
    assert seg is not None
    path = tmp_path / "ct-heatmap.dcm"
    seg.save_as(path)
    assert dciodvfy(path).errors == []
    back = hd.seg.segread(path)
    assert [item.SegmentLabel for item in back.SegmentSequence] == [
        "Class activation map: Nodule", "Grad-CAM: Lung"]
    assert int(back.NumberOfFrames) == 6 + 3  # frames where a map is zero are left out
    uids = [ds.SOPInstanceUID for ds in ct_slices]
    values = back.get_pixels_by_source_instance(
        uids, segment_numbers=[1, 2], rescale_fractional=True,
        assert_missing_frames_are_empty=True,
    )
    for index, heatmap in enumerate(prediction.heatmaps):
        error = np.abs(values[..., index] - heatmap.array)
        assert float(error.max()) <= 1.0 / 255.0 + 1e-6
    check_patient_study(back, ct_slices[0])
    again = build_heatmap_seg(ct_slices, prediction, ctx)
    assert again is not None and again.SOPInstanceUID == seg.SOPInstanceUID
    assert again.SeriesInstanceUID == seg.SeriesInstanceUID
    other = build_heatmap_seg(ct_slices, prediction, context("another-job"))
    assert other is not None and other.SOPInstanceUID != seg.SOPInstanceUID
    assert seg.SOPInstanceUID != ctx.uids(ResultKind.SEG)[1]


def test_heatmap_seg_all_zero_and_none(radiographs: dict[str, Dataset], tmp_path: Path) -> None:
    source = radiographs["NIH_CXR14_SC_Covid0000.dcm"]
    ctx = context("zero", name="cxr-pneumonia")
    assert build_heatmap_seg([source], Prediction(findings=[Finding(PNEUMONIA, 0.1, 0.5)]),
                             ctx) is None
    zero = np.zeros((1, int(source.Rows), int(source.Columns)), dtype=np.float32)
    seg = build_heatmap_seg([source], Prediction(heatmaps=[Heatmap(PNEUMONIA, zero)]), ctx)
    assert seg is not None and int(seg.NumberOfFrames) == 1
    path = tmp_path / "zero.dcm"
    seg.save_as(path)
    assert dciodvfy(path).errors == []


def test_heatmap_seg_checks_its_input(ct_slices: list[Dataset]) -> None:
    sources = ct_slices[:2]
    ctx = context("checks")
    good = np.zeros((2, 512, 512), dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        build_heatmap_seg(sources, Prediction(heatmaps=[Heatmap(NODULE, good[:1])]), ctx)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_heatmap_seg(sources, Prediction(heatmaps=[Heatmap(NODULE, good + 1.5)]), ctx)
    with pytest.raises(ValueError, match="finite"):
        build_heatmap_seg(sources, Prediction(heatmaps=[Heatmap(NODULE, good * np.nan)]), ctx)
    with pytest.raises(TypeError, match="float"):
        build_heatmap_seg(sources, Prediction(heatmaps=[Heatmap(NODULE, good > 0)]), ctx)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- SC of a CT


def test_ct_sc_images_validate(ct_sc: ScCase) -> None:
    assert len(ct_sc.paths) == 3
    for path in ct_sc.paths:
        assert dciodvfy(path).errors == []


def test_ct_sc_attributes_and_references(ct_sc: ScCase, ct_slices: list[Dataset]) -> None:
    by_uid = {ds.SOPInstanceUID: index for index, ds in enumerate(ct_slices)}
    indices = []
    for number, sc in enumerate(ct_sc.read, start=1):
        check_sc_basics(sc, ct_sc.ctx, number)
        check_patient_study(sc, ct_slices[0])
        (source_ref,) = sc.SourceImageSequence
        (related,) = sc.ReferencedImageSequence
        assert source_ref.ReferencedSOPInstanceUID == related.ReferencedSOPInstanceUID
        assert source_ref.ReferencedSOPClassUID == ct_slices[0].SOPClassUID
        assert source_ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        indices.append(by_uid[source_ref.ReferencedSOPInstanceUID])
        assert sc.Columns == 512 and list(sc.PatientOrientation) == ["L", "P"]
        assert sc.BodyPartExamined == "CHEST"
    assert indices == sorted(indices) and min(np.diff(indices)) >= 3  # spread out


def test_ct_sc_outlines_banner_and_legend(
    ct_sc: ScCase, ct_slices: list[Dataset], ct_prediction: Prediction
) -> None:
    by_uid = {ds.SOPInstanceUID: index for index, ds in enumerate(ct_slices)}
    for sc in ct_sc.read:
        index = by_uid[sc.SourceImageSequence[0].ReferencedSOPInstanceUID]
        pixels: npt.NDArray[np.uint8] = sc.pixel_array
        top = banner_height(pixels)
        image = pixels[top : top + 512]
        bottom = legend_top(pixels)
        assert bottom == top + 512, (top, bottom)
        assert pixels.shape[0] - bottom >= 80  # several legend lines
        legend = pixels[bottom:]
        for number, segment in enumerate(ct_prediction.segments, start=1):
            colour = segment_colour(number)
            edge = border(segment.mask[index])
            assert edge.sum() > 100
            hits = is_colour(image, colour)
            assert hits[edge].mean() > 0.95, number  # the outline lies on the mask border
            assert not hits[~grow(edge, 3)].any(), number  # and nowhere else
            assert is_colour(legend, colour).sum() > 50  # its swatch in the legend


def test_ct_sc_png_for_review(ct_sc: ScCase) -> None:
    Image.fromarray(ct_sc.read[1].pixel_array).save(PNG_CT)
    assert PNG_CT.stat().st_size > 10_000


def test_ct_sc_is_deterministic(ct_sc: ScCase, ct_slices: list[Dataset], ct_volume: Volume,
                                ct_prediction: Prediction) -> None:
    again = build_sc(ct_slices, ct_volume, ct_prediction, ct_sc.ctx, max_images=2)
    assert [ds.SOPInstanceUID for ds in again] == [
        ds.SOPInstanceUID for ds in ct_sc.built[:2]]
    other = build_sc(ct_slices, ct_volume, ct_prediction, context("another-job"), max_images=1)
    assert other[0].SOPInstanceUID not in {ds.SOPInstanceUID for ds in ct_sc.built}
    assert other[0].SeriesInstanceUID != ct_sc.built[0].SeriesInstanceUID


def test_ct_sc_findings_only_shows_the_middle_slice(
    ct_slices: list[Dataset], ct_volume: Volume, tmp_path: Path
) -> None:
    prediction = Prediction(findings=[Finding(NODULE, probability=0.2, threshold=0.5)])
    (sc,) = build_sc(ct_slices, ct_volume, prediction, context("findings"))
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ct_slices[15].SOPInstanceUID
    path = tmp_path / "findings.dcm"
    sc.save_as(path)
    assert dciodvfy(path).errors == []


def test_sc_of_multiframe_ct_references_frames(tmp_path: Path) -> None:
    if not MULTIFRAME_CT.is_file():
        pytest.skip(f"{MULTIFRAME_CT} not available")
    source = read_source(MULTIFRAME_CT)
    # Frames in stored order (the mask's first axis is the frame index, as for the SEG);
    # node.infer.volume refuses this sample because its frames are not in slice order.
    groups = source.PerFrameFunctionalGroupsSequence[0]
    transform = groups.get("PixelValueTransformationSequence") or (
        source.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence)
    hu = (source.pixel_array.astype(np.float32) * float(transform[0].RescaleSlope)
          + float(transform[0].RescaleIntercept))
    volume = Volume(array=hu, spacing=(8.0, 0.65, 0.65), modality="CT",
                    slice_uids=(source.SOPInstanceUID,))
    shape = volume.array.shape
    mask = np.zeros(shape, dtype=bool)
    mask[5:20, 150:350, 80:230] = True
    prediction = Prediction(
        segments=[Segment(1, "Right lung", ANATOMY, LUNG, mask, type_modifier=RIGHT)],
        measurements=[Measurement(VOLUME, 1234.5, ML, segment_number=1)],
    )
    images = build_sc([source], volume, prediction, context("mf"))
    assert len(images) == 3
    for number, sc in enumerate(images, start=1):
        path = tmp_path / f"mf-{number}.dcm"
        sc.save_as(path)
        assert dciodvfy(path).errors == []
        (ref,) = sc.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert 6 <= int(ref.ReferencedFrameNumber) <= 20


def test_sc_checks_its_input(ct_slices: list[Dataset], ct_volume: Volume) -> None:
    ctx = context("checks")
    wrong = Segment(1, "Right lung", ANATOMY, LUNG, np.zeros((3, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="mask shape"):
        build_sc(ct_slices, ct_volume, Prediction(segments=[wrong]), ctx)
    with pytest.raises(ValueError, match="max_images"):
        build_sc(ct_slices, ct_volume, Prediction(), ctx, max_images=0)
    with pytest.raises(ValueError, match="do not match"):
        build_sc(ct_slices[:5], ct_volume, Prediction(), ctx)


# --------------------------------------------------------------------------- SC of a radiograph


@pytest.fixture(scope="module")
def cxr_sc(radiographs: dict[str, Dataset], cxr_heatmaps: dict[str, tuple[Volume, Prediction]],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, ScCase]:
    directory = tmp_path_factory.mktemp("cxr-sc")
    cases = {}
    for name, source in radiographs.items():
        volume, prediction = cxr_heatmaps[name]
        ctx = context("job-sc-" + name, name="cxr-pneumonia")
        built = build_sc([source], volume, prediction, ctx)
        paths = write_all(directory, name.removesuffix(".dcm"), built)
        cases[name] = ScCase(ctx, built, paths, [pydicom.dcmread(path) for path in paths])
    return cases


@pytest.mark.parametrize("name", RADIOGRAPHS)
def test_cxr_sc_image(name: str, cxr_sc: dict[str, ScCase], radiographs: dict[str, Dataset],
                      cxr_heatmaps: dict[str, tuple[Volume, Prediction]]) -> None:
    case = cxr_sc[name]
    source = radiographs[name]
    (path,) = case.paths
    assert dciodvfy(path).errors == []
    (sc,) = case.read
    pixels = check_sc_basics(sc, case.ctx, 1)
    check_patient_study(sc, source)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "ReferencedFrameNumber" not in sc.SourceImageSequence[0]

    top = banner_height(pixels)
    bottom = legend_top(pixels)
    image = pixels[top:bottom].astype(np.int32)
    rows, cols = int(source.Rows), int(source.Columns)
    assert max(image.shape[:2]) <= MAX_LONG_SIDE
    assert image.shape[1] == min(cols, round(cols * MAX_LONG_SIDE / max(rows, cols)))
    # The heatmap peak (55 % down, 30 % across) is red; far from it the image stays grey.
    centre = image[round(image.shape[0] * 0.55), round(image.shape[1] * 0.3)]
    assert centre[0] - max(centre[1], centre[2]) > 60, centre
    corner = image[: image.shape[0] // 5, -image.shape[1] // 5 :]
    assert np.array_equal(corner[..., 0], corner[..., 1])
    assert np.array_equal(corner[..., 1], corner[..., 2])
    if name.startswith("DX"):
        Image.fromarray(pixels).save(PNG_CXR)


# --------------------------------------------------------------------------- selection


def destinations_settings(*objects: list[str]) -> Settings:
    """Settings with destinations d0, d1, ... taking ``objects`` (as TOML names them)."""
    return parse_settings("".join(
        f'[[destinations]]\nname = "d{i}"\nae_title = "D{i}"\nhost = "127.0.0.1"\n'
        f"port = 104\nobjects = {kinds!r}\n".replace("'", '"')
        for i, kinds in enumerate(objects)))


def test_destinations_take_their_objects_and_an_sr_brings_its_seg() -> None:
    settings = destinations_settings(["SR"], ["SC", "HEATMAP"], ["SEG"])
    assert settings.destinations[0].objects == [ResultKind.SR]
    assert all(isinstance(kind, ResultKind)
               for d in settings.destinations for kind in d.objects)
    assert destination_kinds(settings, "d0") == {ResultKind.SR, ResultKind.SEG}
    assert destination_kinds(settings, "d1") == {ResultKind.SC, ResultKind.HEATMAP}
    assert destination_kinds(settings, "d2") == {ResultKind.SEG}
    assert destination_kinds(settings, "gone") == DEFAULT_KINDS == {ResultKind.SEG, ResultKind.SR}
    kinds = kinds_by_destination(settings, ["d1", "d2"])
    assert list(kinds) == ["d1", "d2"]
    assert wanted_kinds(kinds) == {ResultKind.SC, ResultKind.HEATMAP, ResultKind.SEG}
    assert wanted_kinds({}) == DEFAULT_KINDS
    assert with_requirements(["SR"]) == {ResultKind.SR, ResultKind.SEG}
    default = parse_settings('[[destinations]]\nname = "p"\nae_title = "P"\n'
                             'host = "127.0.0.1"\nport = 104\n')
    assert destination_kinds(default, "p") == {ResultKind.SEG, ResultKind.SR, ResultKind.HEATMAP}


@pytest.mark.parametrize("objects", [["SEG", "PDF"], []])
def test_settings_refuse_unknown_or_no_objects(objects: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"destinations\.0\.objects"):
        destinations_settings(objects)


def kinds_of(objects: list[ResultObject]) -> list[ResultKind]:
    return [obj.kind for obj in objects]


def test_build_results_builds_only_the_wanted_objects(
        radiographs: dict[str, Dataset],
        cxr_heatmaps: dict[str, tuple[Volume, Prediction]]) -> None:
    name = "DX_chest_PA_Canon_966_fixed.dcm"
    source, (volume, prediction) = radiographs[name], cxr_heatmaps[name]
    ctx = context("job-selection", name="cxr-pneumonia")
    assert kinds_of(build_results([source], volume, prediction, ctx, [])) == []
    # A finding without segments: the SR alone, no SEG to bring along.
    assert kinds_of(build_results([source], volume, prediction, ctx, DEFAULT_KINDS)) == [
        ResultKind.SR]
    every = build_results([source], volume, prediction, ctx, set(ResultKind))
    assert kinds_of(every) == [ResultKind.SR, ResultKind.HEATMAP, ResultKind.SC]
    for obj in every:
        assert obj.dataset.SOPInstanceUID == ctx.instance_uid(obj.kind, 1)
    assert kinds_of(build_results([source], volume, prediction, ctx, [ResultKind.HEATMAP])) == [
        ResultKind.HEATMAP]


def test_build_results_of_segments_gives_the_seg_the_sr_references(
        ct_slices: list[Dataset], ct_volume: Volume, ct_prediction: Prediction) -> None:
    ctx = context("job-selection-ct")
    built = build_results(ct_slices, ct_volume, ct_prediction, ctx, [ResultKind.SR])
    assert kinds_of(built) == [ResultKind.SEG, ResultKind.SR]
    seg, sr = (obj.dataset for obj in built)
    evidence = {item.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence
    assert kinds_of(build_results(ct_slices, ct_volume, ct_prediction, ctx,
                                  [ResultKind.SEG])) == [ResultKind.SEG]
