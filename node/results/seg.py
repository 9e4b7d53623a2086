"""Build a BINARY DICOM Segmentation (SEG) from a model's segments with highdicom."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from models.base import Prediction, Segment
from node.results.common import (
    ResultContext,
    ResultKind,
    coded,
    drop_unreadable_pixel_measures,
    no_patient_name_warning,
    source_headers,
)

#: Longest value of a CS (Code String), used for Content Label.
_CS_MAX = 16

#: Longest value of a LO (Long String).
_LO_MAX = 64


def segment_numbers(prediction: Prediction) -> dict[int, int]:
    """Map each model segment number to its SEG segment number.

    DICOM needs segment numbers 1..n without gaps; the model's numbers are kept
    when they already are 1..n, otherwise segments are renumbered in ascending
    order of their model number. ``build_sr`` uses the same mapping.
    """
    numbers = [segment.number for segment in prediction.segments]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"segment numbers are not unique: {numbers}")
    return {number: rank for rank, number in enumerate(sorted(numbers), start=1)}


def expected_mask_shape(sources: Sequence[Dataset]) -> tuple[int, int, int]:
    """(slices, rows, columns) a mask over ``sources`` must have.

    Slices are the single-frame sources in the given order, or the frames of one
    multi-frame source.
    """
    first = sources[0]
    slices = len(sources) if len(sources) > 1 else int(first.get("NumberOfFrames", 1))
    return slices, int(first.Rows), int(first.Columns)


def tracking_uid(ctx: ResultContext, seg_number: int) -> str:
    """Tracking Unique Identifier of SEG segment ``seg_number``, shared by the SEG and the SR."""
    return ctx.job_uid("segment", str(seg_number))


def tracking_id(segment: Segment) -> str:
    """Human-readable tracking identifier of ``segment``, shared by the SEG and the SR."""
    return (segment.tracking_id or segment.label)[:_LO_MAX]


def algorithm_identification(ctx: ResultContext) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification: the model, its version, family "Artificial Intelligence"."""
    return hd.AlgorithmIdentificationSequence(
        name=ctx.model_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=ctx.algorithm_id_version,
        source=ctx.manufacturer,
    )


def _content_label(model_name: str) -> str:
    label = re.sub(r"[^A-Z0-9_ ]", "_", model_name.upper()).strip()
    return (label or "AINODE")[:_CS_MAX]


def _check_segments(prediction: Prediction, shape: tuple[int, int, int]) -> None:
    for segment in prediction.segments:
        if not isinstance(segment, Segment):
            raise TypeError(f"expected models.base.Segment, got {type(segment).__name__}")
        mask = segment.mask
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            raise TypeError(f"segment {segment.number}: mask must be a bool numpy array")
        if mask.shape != shape:
            raise ValueError(
                f"segment {segment.number}: mask shape {mask.shape} != sources {shape}"
            )
        if not segment.label.strip() or len(segment.label) > _LO_MAX:
            raise ValueError(f"segment {segment.number}: label must have 1 to 64 characters")


def _segment_description(
    segment: Segment, seg_number: int, ctx: ResultContext
) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=seg_number,
        segment_label=segment.label,
        segmented_property_category=coded(segment.category),
        segmented_property_type=coded(segment.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(ctx),
        tracking_uid=tracking_uid(ctx, seg_number),
        tracking_id=tracking_id(segment),
    )
    if segment.type_modifier is not None:
        # The modifier (e.g. laterality) is nested in the type's code item (PS3.3 C.8.20.2).
        type_item = description.SegmentedPropertyTypeCodeSequence[0]
        type_item.SegmentedPropertyTypeModifierCodeSequence = [coded(segment.type_modifier)]
    return description


def segment_pixels(masks: Sequence[npt.NDArray[np.bool_]]) -> npt.NDArray[Any]:
    """The pixel array for highdicom: a label map when no two masks overlap, else the stack.

    A label map (value n where mask n is set, 0 elsewhere) gives the same BINARY
    SEG frames as the masks stacked along a last axis, but highdicom checks a
    stack for overlaps by summing over that axis (seconds for a 300-slice CT),
    and a label map by its maximum. Overlapping masks cannot be one label map;
    they are stacked.
    """
    labels = np.zeros(masks[0].shape, dtype=np.uint8 if len(masks) < 256 else np.uint16)
    for number, mask in enumerate(masks, start=1):
        np.copyto(labels, number, where=mask)
    if np.count_nonzero(labels) == sum(np.count_nonzero(mask) for mask in masks):
        return labels
    return np.stack(masks, axis=-1)


def _add_patient_orientation(seg: hd.seg.Segmentation, source: Dataset) -> None:
    """Add Patient Orientation (General Image, Type 2C) to a SEG without plane orientation.

    highdicom leaves it out; it is required when the image has no Image
    Orientation (Patient), i.e. for a SEG of a projection radiograph. The source's
    value is copied, or the attribute is left empty when the source has none.
    """
    shared = seg.get("SharedFunctionalGroupsSequence")
    oriented = shared is not None and "PlaneOrientationSequence" in shared[0]
    if oriented or "PatientOrientation" in seg:
        return
    seg.PatientOrientation = source.get("PatientOrientation")


def build_seg(
    sources: Sequence[Dataset], prediction: Prediction, ctx: ResultContext
) -> hd.seg.Segmentation | None:
    """Return a BINARY SEG of all segments of ``prediction``, or None when it has none.

    ``sources`` are the source slices in the order of the masks' first axis
    (volume order), or one multi-frame image. Empty frames are omitted; a segment
    whose mask is empty is still described. UIDs, series number and description
    come from ``ctx``; patient and study attributes are copied from the sources.
    """
    if not isinstance(prediction, Prediction):
        raise TypeError(f"expected models.base.Prediction, got {type(prediction).__name__}")
    if not isinstance(ctx, ResultContext):
        raise TypeError(f"expected ResultContext, got {type(ctx).__name__}")
    headers = source_headers(sources)
    if not prediction.segments:
        return None
    shape = expected_mask_shape(headers)
    _check_segments(prediction, shape)
    numbering = segment_numbers(prediction)

    ordered = sorted(prediction.segments, key=lambda s: numbering[s.number])
    pixel_array = segment_pixels([segment.mask for segment in ordered])
    descriptions = [
        _segment_description(segment, numbering[segment.number], ctx) for segment in ordered
    ]
    model_text = f"{ctx.model_name} {ctx.model_version}"
    with no_patient_name_warning():
        seg = hd.seg.Segmentation(
            source_images=headers,
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            content_label=_content_label(ctx.model_name),
            content_description=f"AI segmentation by {model_text}, not verified"[:_LO_MAX],
            omit_empty_frames=True,
            **ctx.identity(ResultKind.SEG),
        )
    _add_patient_orientation(seg, headers[0])
    drop_unreadable_pixel_measures(seg)
    return seg
