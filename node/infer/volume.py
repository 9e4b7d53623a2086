"""Build a model's input volume from the stored instances of one series.

Cross-sectional series (CT, MR; one file per slice, or one enhanced multi-frame
file) become a (slices, rows, columns) float32 volume sorted by position along
the slice normal, rescaled to Hounsfield units for CT. Radiographs (CR, DX and
secondary captures of them) become one display-ready image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt
from pydicom import Dataset

from models.base import UnsupportedInput, Volume
from node.infer.radiograph import radiograph_to_volume

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})


@dataclass(frozen=True)
class SeriesVolume:
    """The volume and the source datasets in volume order (one per slice, or one multi-frame)."""

    volume: Volume
    sources: tuple[Dataset, ...]
    multiframe: bool = False


def _is_localizer(ds: Dataset) -> bool:
    return "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]


def _normal(orientation: Sequence[float]) -> npt.NDArray[np.float64]:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    return np.cross(row, col)


def _slice_spacing(positions: npt.NDArray[np.float64], fallback: float) -> float:
    if len(positions) < 2:
        return fallback
    gaps = np.diff(np.sort(positions))
    gaps = gaps[gaps > 1e-3]
    return float(np.median(gaps)) if len(gaps) else fallback


def _rescale(pixels: npt.NDArray[np.generic], slope: float, intercept: float
             ) -> npt.NDArray[np.float32]:
    return (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept))


def _classic_stack(datasets: Sequence[Dataset]) -> SeriesVolume:
    images = [ds for ds in datasets if "PixelData" in ds and not _is_localizer(ds)]
    if not images:
        raise UnsupportedInput("series has no image other than localizers")
    first = images[0]
    orientation = [float(v) for v in first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    shape = (int(first.Rows), int(first.Columns))
    same = [ds for ds in images
            if (int(ds.Rows), int(ds.Columns)) == shape
            and np.allclose([float(v) for v in ds.get("ImageOrientationPatient", orientation)],
                            orientation, atol=1e-3)]
    if len(same) != len(images):
        raise UnsupportedInput("series mixes image sizes or orientations (not one volume)")
    normal = _normal(orientation)
    positions = np.array([
        float(np.dot(normal, [float(v) for v in ds.get("ImagePositionPatient", [0, 0, i])]))
        for i, ds in enumerate(same)
    ])
    order = np.argsort(positions, kind="stable")
    ordered = [same[i] for i in order]
    slices = [
        _rescale(ds.pixel_array, float(ds.get("RescaleSlope", 1) or 1),
                 float(ds.get("RescaleIntercept", 0) or 0))
        for ds in ordered
    ]
    spacing_rc = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    thickness = float(first.get("SliceThickness", 1.0) or 1.0)
    volume = Volume(
        array=np.stack(slices).astype(np.float32, copy=False),
        spacing=(_slice_spacing(positions, thickness), spacing_rc[0], spacing_rc[1]),
        modality=str(first.get("Modality", "")),
        slice_uids=tuple(str(ds.SOPInstanceUID) for ds in ordered),
        body_part=str(first.get("BodyPartExamined", "")),
        orientation=tuple(orientation),
    )
    return SeriesVolume(volume=volume, sources=tuple(ordered))


def _frame_attr(ds: Dataset, index: int, sequence: str, keyword: str) -> object:
    """An attribute from the per-frame functional group, else the shared one."""
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"),
                   ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        item = groups[index] if groups is ds.get("PerFrameFunctionalGroupsSequence") else groups[0]
        seq = item.get(sequence)
        if seq and keyword in seq[0]:
            return seq[0].get(keyword)
    return None


def _multiframe(ds: Dataset) -> SeriesVolume:
    frames = int(ds.get("NumberOfFrames", 1))
    pixels = ds.pixel_array.reshape(frames, int(ds.Rows), int(ds.Columns))
    orientation = _frame_attr(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    if orientation is None:
        raise UnsupportedInput("multi-frame image without plane orientation")
    normal = _normal([float(v) for v in cast(Sequence[float], orientation)])
    positions = np.array([
        float(np.dot(normal, [float(v) for v in cast(Sequence[float], (
            _frame_attr(ds, i, "PlanePositionSequence", "ImagePositionPatient") or [0, 0, i]))]))
        for i in range(frames)
    ])
    order = np.argsort(positions, kind="stable")
    slices = []
    for i in order:
        slope = _frame_attr(ds, int(i), "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _frame_attr(ds, int(i), "PixelValueTransformationSequence",
                                "RescaleIntercept")
        slices.append(_rescale(pixels[i], float(slope or 1), float(intercept or 0)))  # type: ignore[arg-type]
    measures = ds.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
    spacing_rc = [float(v) for v in (measures[0].PixelSpacing if measures else [1.0, 1.0])]
    thickness = float(measures[0].get("SliceThickness", 1.0) if measures else 1.0)
    volume = Volume(
        array=np.stack(slices).astype(np.float32, copy=False),
        spacing=(_slice_spacing(positions, thickness), spacing_rc[0], spacing_rc[1]),
        modality=str(ds.get("Modality", "")),
        slice_uids=(str(ds.SOPInstanceUID),),
        body_part=str(ds.get("BodyPartExamined", "")),
        orientation=tuple(float(v) for v in cast(Sequence[float], orientation)),
    )
    if not np.array_equal(order, np.arange(frames)):
        raise UnsupportedInput("multi-frame image whose frames are not stored in slice order")
    return SeriesVolume(volume=volume, sources=(ds,), multiframe=True)


def _one_radiograph(datasets: Sequence[Dataset]) -> Dataset:
    """The one radiograph of a series; of several, the one frontal (PA/AP) view."""
    if len(datasets) == 1:
        return datasets[0]
    frontal = [ds for ds in datasets if str(ds.get("ViewPosition", "")).upper() in ("PA", "AP")]
    if len(frontal) == 1:
        return frontal[0]
    raise UnsupportedInput(f"{len(datasets)} radiographs in one series and "
                           f"{len(frontal)} frontal (PA/AP) views; expected one")


def build_volume(datasets: Sequence[Dataset]) -> SeriesVolume:
    """Turn the instances of one series into a :class:`SeriesVolume`."""
    if not datasets:
        raise UnsupportedInput("series has no instances")
    modality = str(datasets[0].get("Modality", ""))
    if modality in RADIOGRAPH_MODALITIES:
        image = _one_radiograph(datasets)
        return SeriesVolume(volume=radiograph_to_volume(image), sources=(image,))
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        return _multiframe(datasets[0])
    return _classic_stack(datasets)
