"""Build a FRACTIONAL DICOM Segmentation of a model's class-activation heatmaps with highdicom.

Each :class:`models.base.Heatmap` becomes one segment whose frames hold the map's
values in [0, 1], stored as 8-bit fractions (Maximum Fractional Value 255,
Segmentation Fractional Type PROBABILITY), so a value round-trips within 1/255:

* Segmented Property Category: SCT 49755003 "Morphologically Abnormal Structure"
  (CID 7150; older editions call it "Morphologically Altered Structure");
* Segmented Property Type: the heatmap's finding code (e.g. SCT 233604007 "Pneumonia");
* Segment Label: the heatmap's label and the finding, e.g. "Class activation map:
  Pneumonia"; Segment Description: an AI explanation, not a segmentation;
* algorithm identification (the model and its version, family "Artificial Intelligence");
* Content Label "HEATMAP", Content Description saying it is a class activation map.

Why a fractional SEG and not a Parametric Map: a SEG is what PACS viewers that
show AI overlays know best, it carries coded finding types and the algorithm per
segment, and an 8-bit fractional SEG is small. It validates (``dciodvfy``: zero
errors) for a CT series and for single-frame radiographs: CR (JPEG 2000,
MONOCHROME1, ``PixelSpacing 0\\0``, which :func:`node.results.common.source_headers`
drops), DX, and an 8-bit Secondary Capture with a minimal header (the NIH chest
X-ray); for a projection image without plane orientation the Patient Orientation
is copied from the source or left empty (Type 2C), as in the BINARY SEG. The
values are probabilities in the sense of the map only: the heatmap shows where the
model looked for the finding and is not a segmentation of it, which every text
attribute says.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from models.base import Heatmap, Prediction
from node.results.common import (
    ResultContext,
    ResultKind,
    coded,
    drop_unreadable_pixel_measures,
    identify_local_schemes,
    no_patient_name_warning,
    source_headers,
)
from node.results.seg import (
    _add_patient_orientation,
    algorithm_identification,
    expected_mask_shape,
)

#: Segmented Property Category of every heatmap segment (CID 7150).
HEATMAP_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure

#: Content Label (CS, at most 16 characters) of the heatmap SEG.
CONTENT_LABEL = "HEATMAP"

#: Content Description (LO) of the heatmap SEG.
CONTENT_DESCRIPTION = "AI class activation map (explanation, not a segmentation)"

#: Largest stored fraction: values are kept as 8-bit fractions of 255.
MAX_FRACTIONAL_VALUE = 255

_LO_MAX = 64
_ST_MAX = 1024

__all__ = [
    "CONTENT_DESCRIPTION",
    "CONTENT_LABEL",
    "HEATMAP_CATEGORY",
    "MAX_FRACTIONAL_VALUE",
    "build_heatmap_seg",
    "drop_unreadable_pixel_measures",
    "heatmap_label",
]


def heatmap_label(heatmap: Heatmap) -> str:
    """Segment Label of ``heatmap``: its label and the finding, at most 64 characters."""
    label = heatmap.label.strip() or "Class activation map"
    text = f"{label}: {heatmap.finding.meaning}"
    return text[:_LO_MAX]


def _segment_description_text(heatmap: Heatmap, ctx: ResultContext) -> str:
    text = (
        f"Class activation map of {ctx.model_name} {ctx.model_version} for "
        f"{heatmap.finding.meaning}: where the model looked (AI explanation); "
        "not a segmentation of the finding, not verified by a radiologist"
    )
    return text[:_ST_MAX]


def _check_heatmaps(heatmaps: Sequence[Heatmap], shape: tuple[int, int, int]) -> None:
    """Raise unless each heatmap is a finite float array of ``shape`` with values in [0, 1]."""
    for index, heatmap in enumerate(heatmaps, start=1):
        if not isinstance(heatmap, Heatmap):
            raise TypeError(f"expected models.base.Heatmap, got {type(heatmap).__name__}")
        coded(heatmap.finding)  # raises for an incomplete code
        array = heatmap.array
        if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"heatmap {index}: array must be a float numpy array")
        if array.shape != shape:
            raise ValueError(f"heatmap {index}: shape {array.shape} != sources {shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"heatmap {index}: values must be finite")
        if array.size and (float(array.min()) < 0.0 or float(array.max()) > 1.0):
            raise ValueError(f"heatmap {index}: values must be in [0, 1]")


def _segment_description(
    heatmap: Heatmap, seg_number: int, ctx: ResultContext
) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=seg_number,
        segment_label=heatmap_label(heatmap),
        segmented_property_category=coded(HEATMAP_CATEGORY),
        segmented_property_type=coded(heatmap.finding),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(ctx),
        tracking_uid=ctx.job_uid("heatmap", str(seg_number)),
        tracking_id=f"AI heatmap {seg_number}: {heatmap.finding.meaning}"[:_LO_MAX],
    )
    description.SegmentDescription = _segment_description_text(heatmap, ctx)
    return description


def _pixel_array(heatmaps: Sequence[Heatmap]) -> npt.NDArray[np.float32]:
    """(frames, rows, columns, segments) float32 with the maps' values."""
    return np.stack([np.asarray(h.array, dtype=np.float32) for h in heatmaps], axis=-1)


def build_heatmap_seg(
    sources: Sequence[Dataset], prediction: Prediction, ctx: ResultContext
) -> hd.seg.Segmentation | None:
    """Return a FRACTIONAL SEG with one segment per heatmap of ``prediction``, or None.

    ``sources`` are the source slices in the order of the heatmaps' first axis
    (volume order), or one multi-frame image, or one radiograph (heatmaps of shape
    (1, rows, columns)). Frames where a map is zero are omitted (a map that is zero
    everywhere keeps its segment description). UIDs, series number and the series
    description ("AI <model> <version> HEATMAP") come from ``ctx``; patient and study
    attributes are copied from the sources. Raises ``ValueError`` or ``TypeError``
    for heatmaps that do not match the sources or have values outside [0, 1].
    """
    if not isinstance(prediction, Prediction):
        raise TypeError(f"expected models.base.Prediction, got {type(prediction).__name__}")
    if not isinstance(ctx, ResultContext):
        raise TypeError(f"expected ResultContext, got {type(ctx).__name__}")
    headers = source_headers(sources)
    if not prediction.heatmaps:
        return None
    shape = expected_mask_shape(headers)
    _check_heatmaps(prediction.heatmaps, shape)

    descriptions = [
        _segment_description(heatmap, number, ctx)
        for number, heatmap in enumerate(prediction.heatmaps, start=1)
    ]
    pixel_array = _pixel_array(prediction.heatmaps)
    # highdicom cannot omit every frame: keep them all when every map is zero.
    omit_empty = bool(np.any(pixel_array > 0.0))
    with no_patient_name_warning():
        seg = hd.seg.Segmentation(
            source_images=headers,
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            max_fractional_value=MAX_FRACTIONAL_VALUE,
            segment_descriptions=descriptions,
            content_label=CONTENT_LABEL,
            content_description=CONTENT_DESCRIPTION,
            omit_empty_frames=omit_empty,
            **ctx.identity(ResultKind.HEATMAP),
        )
    _add_patient_orientation(seg, headers[0])
    drop_unreadable_pixel_measures(seg)
    identify_local_schemes(seg, seg.SegmentSequence)
    return seg
