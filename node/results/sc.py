"""Build a secondary-capture "AI result" series: key images with the result burned in.

For viewers that show neither SR nor SEG. Each image is an 8-bit RGB Secondary
Capture (``highdicom.sc.SCImage``, Modality OT, Conversion Type WSD, Image Type
DERIVED\\SECONDARY, Burned In Annotation YES) laid out as::

    +------------------------------------------+
    | AI RESULT - NOT FOR PRIMARY DIAGNOSIS    |  red banner
    +------------------------------------------+
    |                                          |
    |  the source image (CT: lung window       |
    |  -600/1500; radiograph: as displayed)    |
    |  with each segment's outline in its own  |
    |  colour and each heatmap blended in as a |
    |  colour map where it is >= 0.2           |
    |                                          |
    +------------------------------------------+
    | model name, version; findings with       |  legend
    | probability and present/absent; segment  |
    | colours with their measurements; ...     |
    +------------------------------------------+

Key images: a radiograph gives one image. For a CT (any multi-slice volume) the
slices are weighted by the segmented area (all segments), else by the heatmaps'
sum; up to ``max_images`` slices are taken, each the largest within a narrow window
(a quarter of the spacing of the targets) around 25/50/75 % (for three) of the
extent from the first to the last weighted slice, so they are spread out.
Without segments or heatmaps the middle slice is shown with the legend.

The image part is scaled so that its long side is 512 to 1024 pixels (a 512 x 512
CT stays as it is; a 2000-pixel radiograph is halved), taking non-square pixel
spacing into account. Every image references its source image (Source Image
Sequence and Referenced Image Sequence, with the frame number for a multi-frame
source), carries the source's patient and study attributes, and gets UIDs from the
:class:`~node.results.common.ResultContext` (one series, one SOP Instance UID per
image index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from models.base import Finding, Heatmap, Measurement, Prediction, Segment, Volume
from node.results.common import (
    ResultContext,
    ResultKind,
    no_patient_name_warning,
    patient_study_elements,
    source_headers,
)
from node.results.seg import segment_numbers

RGB = tuple[int, int, int]
UInt8Array = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

#: Text of the banner on top of every image.
BANNER_TEXT = "AI RESULT - NOT FOR PRIMARY DIAGNOSIS"

#: Banner background and text colours.
BANNER_COLOUR: RGB = (200, 0, 0)
BANNER_TEXT_COLOUR: RGB = (255, 255, 255)

#: Legend band background and text colours.
LEGEND_BACKGROUND: RGB = (24, 24, 24)
LEGEND_TEXT_COLOUR: RGB = (235, 235, 235)
PRESENT_COLOUR: RGB = (255, 170, 40)
ABSENT_COLOUR: RGB = (150, 220, 150)

#: Outline colours of segments 1, 2, ... (cycled); none is the banner red or a grey.
SEGMENT_COLOURS: tuple[RGB, ...] = (
    (255, 215, 0),  # yellow
    (0, 200, 255),  # sky blue
    (0, 230, 0),  # green
    (255, 0, 255),  # magenta
    (255, 140, 0),  # orange
    (150, 110, 255),  # violet
    (0, 255, 190),  # aquamarine
    (255, 120, 180),  # pink
)

#: CT lung window (center, width) in HU.
LUNG_WINDOW = (-600.0, 1500.0)

#: Heatmap values below this are not drawn; the overlay's opacity ramps up above it.
HEATMAP_MIN = 0.2
HEATMAP_MAX_ALPHA = 0.5

#: Colour map of the heatmap overlay (value -> RGB), a "jet"-like ramp.
_COLOUR_MAP_POSITIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
_COLOUR_MAP_COLOURS: tuple[RGB, ...] = (
    (0, 0, 255),
    (0, 255, 255),
    (0, 255, 0),
    (255, 255, 0),
    (255, 0, 0),
)

#: Long side of the image part: at least this (small images are enlarged) ...
MIN_LONG_SIDE = 512
#: ... and at most this (large radiographs are reduced).
MAX_LONG_SIDE = 1024

#: Purpose of the source image reference (CID 7202).
_SOURCE_PURPOSE = codes.DCM.SourceImageForImageProcessingOperation

#: UCUM codes shown differently in the legend.
_UNIT_TEXT = {"[hnsf'U]": "HU", "1": "", "{ratio}": ""}

_ST_MAX = 1024


@dataclass(frozen=True)
class KeyImage:
    """One rendered key image: the RGB pixels and the volume slice it shows."""

    pixels: UInt8Array
    slice_index: int


# --------------------------------------------------------------------------- checks


def _check_inputs(volume: Volume, prediction: Prediction, max_images: int) -> None:
    """Raise unless the prediction's masks and maps have the volume's shape."""
    if not isinstance(volume, Volume):
        raise TypeError(f"expected models.base.Volume, got {type(volume).__name__}")
    if not isinstance(prediction, Prediction):
        raise TypeError(f"expected models.base.Prediction, got {type(prediction).__name__}")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images must be a positive int, got {max_images!r}")
    shape = volume.array.shape
    if volume.array.ndim != 3 or 0 in shape:
        raise ValueError(f"volume array must be (slices, rows, columns), got {shape}")
    for segment in prediction.segments:
        if not isinstance(segment, Segment):
            raise TypeError(f"expected models.base.Segment, got {type(segment).__name__}")
        if segment.mask.shape != shape:
            raise ValueError(f"segment {segment.number}: mask shape {segment.mask.shape} "
                             f"!= volume {shape}")
    for index, heatmap in enumerate(prediction.heatmaps, start=1):
        if not isinstance(heatmap, Heatmap):
            raise TypeError(f"expected models.base.Heatmap, got {type(heatmap).__name__}")
        if heatmap.array.shape != shape:
            raise ValueError(f"heatmap {index}: shape {heatmap.array.shape} != volume {shape}")


def _source_for_slices(
    headers: Sequence[Dataset], volume: Volume
) -> list[tuple[Dataset, int | None]]:
    """For each volume slice: the source header and the frame number (multi-frame) or None.

    Slices are matched to sources by ``volume.slice_uids`` when they name the
    sources, else by position.
    """
    slices = int(volume.array.shape[0])
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    if len(headers) == slices:
        uids = volume.slice_uids
        if len(uids) == slices and all(uid in by_uid for uid in uids):
            return [(by_uid[uid], None) for uid in uids]
        return [(h, None) for h in headers]
    if len(headers) == 1 and int(headers[0].get("NumberOfFrames", 1) or 1) == slices:
        return [(headers[0], index + 1) for index in range(slices)]
    raise ValueError(f"{len(headers)} source(s) do not match a volume of {slices} slices")


# --------------------------------------------------------------------------- key slices


def slice_weights(prediction: Prediction, slices: int) -> npt.NDArray[np.float64]:
    """Per slice: the segmented area (all segments), else the heatmaps' sum, else zeros."""
    if prediction.segments:
        union = np.zeros(prediction.segments[0].mask.shape, dtype=bool)
        for segment in prediction.segments:
            union |= segment.mask
        area: npt.NDArray[np.float64] = union.reshape(slices, -1).sum(axis=1).astype(np.float64)
        return area
    if prediction.heatmaps:
        total = np.zeros(slices, dtype=np.float64)
        for heatmap in prediction.heatmaps:
            total += np.asarray(heatmap.array, dtype=np.float64).reshape(slices, -1).sum(axis=1)
        return total
    return np.zeros(slices, dtype=np.float64)


def key_slices(weights: npt.NDArray[np.float64], max_images: int) -> list[int]:
    """Indices of up to ``max_images`` key slices, in ascending order.

    With ``n`` images the targets lie at ``k / (n + 1)`` (k = 1..n) of the extent
    from the first to the last slice of positive weight; each pick is the slice of
    largest weight within a quarter of the target spacing of its target, so picks
    stay at least half a spacing apart. Without any positive weight the middle
    slice is returned.
    """
    count = int(weights.shape[0])
    positive = np.flatnonzero(weights > 0)
    if positive.size == 0:
        return [count // 2]
    first, last = int(positive[0]), int(positive[-1])
    n = min(max_images, int(positive.size))
    extent = last - first
    half = extent / (4.0 * (n + 1))
    picks: set[int] = set()
    for k in range(1, n + 1):
        target = first + extent * k / (n + 1)
        low = max(first, math.ceil(target - half))
        high = min(last, math.floor(target + half))
        window = np.arange(low, max(low, high) + 1)
        best = int(window[np.argmax(weights[window])])
        if weights[best] > 0:
            picks.add(best)
    if not picks:
        picks.add(int(positive[np.argmax(weights[positive])]))
    return sorted(picks)


# --------------------------------------------------------------------------- pixels


def display_slice(image: npt.NDArray[np.floating], modality: str) -> UInt8Array:
    """A slice as 8-bit grey: CT in the lung window, [0, 1] data as is, else a 1-99 % window."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if modality.upper() == "CT":
        center, width = LUNG_WINDOW
        low, high = center - width / 2.0, center + width / 2.0
    elif values.size and values.min() >= 0.0 and values.max() <= 1.0:
        low, high = 0.0, 1.0
    else:
        low, high = (float(v) for v in np.percentile(values, (1.0, 99.0)))
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    return np.rint(scaled * 255.0).astype(np.uint8)


def image_size(rows: int, cols: int, spacing: tuple[float, float]) -> tuple[int, int]:
    """(rows, cols) of the image part: square pixels, long side in [512, 1024]."""
    row_mm, col_mm = spacing
    if not (math.isfinite(row_mm) and math.isfinite(col_mm) and row_mm > 0 and col_mm > 0):
        row_mm = col_mm = 1.0
    height, width = rows * row_mm / col_mm, float(cols)
    long_side = max(height, width)
    scale = min(max(long_side, MIN_LONG_SIDE), MAX_LONG_SIDE) / long_side
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize_grey(image: UInt8Array, size: tuple[int, int]) -> UInt8Array:
    if image.shape == size:
        return image
    resized = Image.fromarray(image, mode="L").resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def _resize_float(values: npt.NDArray[np.floating], size: tuple[int, int]) -> FloatArray:
    array = np.asarray(values, dtype=np.float32)
    if array.shape == size:
        return array
    resized = Image.fromarray(array, mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _resize_mask(mask: BoolArray, size: tuple[int, int]) -> BoolArray:
    if mask.shape == size:
        return mask
    resized: BoolArray = _resize_float(mask.astype(np.float32), size) >= 0.5
    return resized


def _erode(mask: BoolArray) -> BoolArray:
    """4-neighbour erosion; pixels outside the image count as background."""
    padded = np.pad(mask, 1, constant_values=False)
    out: BoolArray = (
        padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
        & padded[1:-1, :-2] & padded[1:-1, 2:]
    )
    return out


def _dilate(mask: BoolArray) -> BoolArray:
    """8-neighbour dilation by one pixel."""
    padded = np.pad(mask, 1, constant_values=False)
    out = np.zeros_like(mask)
    rows, cols = mask.shape
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + rows, dx : dx + cols]
    return out


def outline(mask: BoolArray, thickness: int = 1) -> BoolArray:
    """The border of ``mask`` (pixels of the mask next to background), grown ``thickness - 1``
    pixels each way."""
    border: BoolArray = mask & ~_erode(mask)
    for _ in range(max(0, thickness - 1)):
        border = _dilate(border)
    return border


def colour_map(values: FloatArray) -> FloatArray:
    """Map values in [0, 1] to RGB in [0, 255] with a blue-cyan-green-yellow-red ramp."""
    flat = np.clip(values, 0.0, 1.0).ravel()
    channels = [
        np.interp(flat, _COLOUR_MAP_POSITIONS, [c[i] for c in _COLOUR_MAP_COLOURS])
        for i in range(3)
    ]
    return np.stack(channels, axis=-1).reshape((*values.shape, 3)).astype(np.float32)


def blend_heatmap(rgb: FloatArray, heatmap: FloatArray) -> FloatArray:
    """Blend ``heatmap`` into ``rgb`` where it is at least :data:`HEATMAP_MIN`."""
    ramp = np.clip((heatmap - HEATMAP_MIN) / (1.0 - HEATMAP_MIN), 0.0, 1.0)
    alpha = (HEATMAP_MAX_ALPHA * np.sqrt(ramp))[..., np.newaxis]
    blended: FloatArray = rgb * (1.0 - alpha) + colour_map(heatmap) * alpha
    return blended


def segment_colour(seg_number: int) -> RGB:
    """Outline colour of SEG segment ``seg_number`` (1-based)."""
    return SEGMENT_COLOURS[(seg_number - 1) % len(SEGMENT_COLOURS)]


def _outline_thickness(size: tuple[int, int]) -> int:
    return max(2, round(max(size) / 400))


def render_slice(
    volume: Volume, prediction: Prediction, index: int
) -> tuple[UInt8Array, list[tuple[int, bool]]]:
    """The image part of slice ``index`` as RGB, and per SEG segment number whether it shows."""
    size = image_size(
        int(volume.array.shape[1]), int(volume.array.shape[2]), volume.spacing[1:3]
    )
    grey = _resize_grey(display_slice(volume.array[index], volume.modality), size)
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=-1).astype(np.float32)
    for heatmap in prediction.heatmaps:
        rgb = blend_heatmap(rgb, _resize_float(heatmap.array[index], size))
    out = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    thickness = _outline_thickness(size)
    numbering = segment_numbers(prediction)
    shown: list[tuple[int, bool]] = []
    for segment in sorted(prediction.segments, key=lambda s: numbering[s.number]):
        number = numbering[segment.number]
        mask = _resize_mask(segment.mask[index], size)
        shown.append((number, bool(mask.any())))
        out[outline(mask, thickness)] = segment_colour(number)
    return out, shown


# --------------------------------------------------------------------------- legend


@dataclass(frozen=True)
class LegendLine:
    """One legend entry: text, its colour and an optional colour swatch."""

    text: str
    colour: RGB = LEGEND_TEXT_COLOUR
    swatch: RGB | None = None
    colour_bar: bool = False


def format_value(value: float) -> str:
    """A measurement value with four significant digits, without exponent for usual sizes."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}"


def unit_text(measurement: Measurement) -> str:
    """The unit as shown in the legend: the UCUM code, "HU" for Hounsfield units."""
    unit = measurement.unit.value
    if unit in _UNIT_TEXT:
        return _UNIT_TEXT[unit]
    if any(char in unit for char in "[]{}"):
        return measurement.unit.meaning
    return unit


def measurement_text(measurement: Measurement) -> str:
    """E.g. "Volume 2346 ml" or "Mean Attenuation Coefficient -812.5 HU"."""
    name = measurement.name.meaning
    if measurement.derivation is not None:
        name = f"{measurement.derivation.meaning} {name}"
    unit = unit_text(measurement)
    value = format_value(measurement.value)
    return f"{name} {value} {unit}".rstrip() if unit != "%" else f"{name} {value} %"


def finding_line(finding: Finding) -> LegendLine:
    """E.g. "Pneumonia: PRESENT (probability 0.87, threshold 0.50)"."""
    state = "PRESENT" if finding.present else "absent"
    text = (f"{finding.name.meaning}: {state} (probability {finding.probability:.2f}, "
            f"threshold {finding.threshold:.2f})")
    return LegendLine(text, PRESENT_COLOUR if finding.present else ABSENT_COLOUR)


def legend_lines(
    prediction: Prediction,
    ctx: ResultContext,
    shown: Sequence[tuple[int, bool]],
    position: str,
) -> list[LegendLine]:
    """The legend of one key image (see the module docstring)."""
    version = ctx.model_version
    if ctx.algorithm_id_version != ctx.model_version:
        version = f"{version} ({ctx.algorithm_id_version})"
    lines = [LegendLine(f"Model: {ctx.model_name} {version}, {ctx.manufacturer} "
                        f"{ctx.software_version}")]
    lines.extend(finding_line(finding) for finding in prediction.findings)
    numbering = segment_numbers(prediction)
    visible = dict(shown)
    for segment in sorted(prediction.segments, key=lambda s: numbering[s.number]):
        number = numbering[segment.number]
        values = [measurement_text(m) for m in prediction.measurements
                  if m.segment_number == segment.number]
        text = segment.label + (": " + ", ".join(values) if values else "")
        if not visible.get(number, False):
            text += " (not on this image)"
        lines.append(LegendLine(text, swatch=segment_colour(number)))
    study = [measurement_text(m) for m in prediction.measurements if m.segment_number is None]
    if study:
        lines.append(LegendLine("; ".join(study)))
    for heatmap in prediction.heatmaps:
        lines.append(LegendLine(
            f"Colour overlay: where the model looked for {heatmap.finding.meaning} "
            "(class activation map, not an outline of the finding)", colour_bar=True))
    lines.append(LegendLine(f"{position}. AI output, not verified by a radiologist."))
    return lines


def _font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def _wrap(text: str, font: Font, width: float) -> list[str]:
    """Split ``text`` at spaces into lines that fit ``width`` pixels."""
    words = text.split(" ")
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}" if current else word
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return lines


def _font_size(width: int) -> int:
    return max(14, round(width * 0.03))


def _text_height(font: Font) -> int:
    bottom = font.getbbox("Mg")[3]
    return int(bottom) + 2


def banner(width: int) -> UInt8Array:
    """The red "AI RESULT - NOT FOR PRIMARY DIAGNOSIS" band of an image ``width`` wide."""
    size = max(16, round(width * 0.04))
    font = _font(size)
    while size > 8 and font.getlength(BANNER_TEXT) > width * 0.94:
        size -= 1
        font = _font(size)
    height = round(_text_height(font) * 1.8)
    image = Image.new("RGB", (width, height), BANNER_COLOUR)
    draw = ImageDraw.Draw(image)
    x = (width - font.getlength(BANNER_TEXT)) / 2
    y = (height - _text_height(font)) / 2
    draw.text((x, y), BANNER_TEXT, font=font, fill=BANNER_TEXT_COLOUR)
    return np.asarray(image, dtype=np.uint8)


def legend(lines: Sequence[LegendLine], width: int) -> UInt8Array:
    """The legend band: ``lines`` wrapped to ``width`` on a dark background."""
    font = _font(_font_size(width))
    line_height = round(_text_height(font) * 1.3)
    margin = max(6, line_height // 2)
    indent = line_height
    wrapped: list[tuple[LegendLine, list[str]]] = [
        (line, _wrap(line.text, font, width - 2 * margin - indent)) for line in lines
    ]
    bar_rows = sum(1 for line in lines if line.colour_bar)
    rows = sum(len(parts) for _, parts in wrapped) + bar_rows
    height = rows * line_height + 2 * margin
    image = Image.new("RGB", (width, height), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(image)
    y = margin
    box = max(6, line_height * 2 // 3)
    for line, parts in wrapped:
        if line.swatch is not None:
            top = y + (line_height - box) // 2
            draw.rectangle((margin, top, margin + box, top + box), fill=line.swatch)
        for part in parts:
            draw.text((margin + indent, y), part, font=font, fill=line.colour)
            y += line_height
        if line.colour_bar:
            _colour_bar(draw, font, margin + indent, y, width - 2 * margin - indent,
                        line_height)
            y += line_height
    return np.asarray(image, dtype=np.uint8)


def _colour_bar(
    draw: ImageDraw.ImageDraw, font: Font, x: int, y: int, width: int, height: int
) -> None:
    """A "low [ramp] high" colour bar of the heatmap colour map."""
    low_width = font.getlength("low ")
    bar_width = max(10, min(width // 2, 300))
    draw.text((x, y), "low", font=font, fill=LEGEND_TEXT_COLOUR)
    start = x + round(low_width)
    top, bottom = y + height // 5, y + height * 4 // 5
    ramp = colour_map(np.linspace(HEATMAP_MIN, 1.0, bar_width, dtype=np.float32))
    for i, colour in enumerate(ramp):
        r, g, b = (int(c) for c in colour)
        draw.line((start + i, top, start + i, bottom), fill=(r, g, b))
    draw.text((start + bar_width + round(font.getlength(" ")), y), "high", font=font,
              fill=LEGEND_TEXT_COLOUR)


def compose(image: UInt8Array, lines: Sequence[LegendLine]) -> UInt8Array:
    """Banner on top, ``image`` in the middle, the legend below: one RGB array."""
    width = int(image.shape[1])
    return np.concatenate([banner(width), image, legend(lines, width)], axis=0)


def render_key_images(
    volume: Volume, prediction: Prediction, ctx: ResultContext, max_images: int = 3
) -> list[KeyImage]:
    """Render the key images (pixels only); see :func:`build_sc`."""
    _check_inputs(volume, prediction, max_images)
    slices = int(volume.array.shape[0])
    indices = [0] if slices == 1 else key_slices(slice_weights(prediction, slices), max_images)
    images: list[KeyImage] = []
    for number, index in enumerate(indices, start=1):
        pixels, shown = render_slice(volume, prediction, index)
        if slices == 1:
            position = f"Image {number} of {len(indices)}"
        else:
            position = f"Image {number} of {len(indices)}, slice {index + 1} of {slices}"
        lines = legend_lines(prediction, ctx, shown, position)
        images.append(KeyImage(compose(pixels, lines), index))
    return images


# --------------------------------------------------------------------------- DICOM


def patient_orientation(source: Dataset, volume: Volume) -> list[str] | None:
    """Patient Orientation of a key image: the source's, else from the plane orientation."""
    value = source.get("PatientOrientation")
    if value and len(value) == 2 and all(str(v) for v in value):
        return [str(v) for v in value]
    cosines = source.get("ImageOrientationPatient")
    if cosines:
        orientation = [float(v) for v in cosines]
    elif volume.array.shape[0] > 1:  # e.g. a multi-frame source: the volume's orientation
        orientation = [float(v) for v in volume.orientation]
    else:  # a projection image without orientation
        return None
    if len(orientation) != 6:
        return None
    return [_direction_letters(orientation[:3]), _direction_letters(orientation[3:])]


def _direction_letters(vector: Sequence[float]) -> str:
    """Letters of a patient direction (e.g. "L", "PF"), main component first (PS3.3 C.7.6.1.1.1)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = sorted(range(3), key=lambda axis: -abs(vector[axis]))
    text = ""
    for axis in order:
        component = vector[axis]
        if abs(component) > 1e-3:
            text += letters[axis][0] if component > 0 else letters[axis][1]
    return text[:3] or "L"


def _image_reference(source: Dataset, frame: int | None, purpose: bool) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    if purpose:
        code = Dataset()
        code.CodeValue = _SOURCE_PURPOSE.value
        code.CodingSchemeDesignator = _SOURCE_PURPOSE.scheme_designator
        code.CodeMeaning = _SOURCE_PURPOSE.meaning
        item.PurposeOfReferenceCodeSequence = [code]
    return item


def _derivation_description(prediction: Prediction, ctx: ResultContext) -> str:
    burned = []
    if prediction.segments:
        burned.append("segment outlines")
    if prediction.heatmaps:
        burned.append("class activation map")
    what = " and ".join(burned) if burned else "result"
    text = (f"AI result of {ctx.model_name} {ctx.algorithm_id_version}: {what} and legend "
            "burned into the source image; not for primary diagnosis")
    return text[:_ST_MAX]


def sc_dataset(
    image: KeyImage,
    number: int,
    source: Dataset,
    frame: int | None,
    volume: Volume,
    prediction: Prediction,
    ctx: ResultContext,
) -> hd.sc.SCImage:
    """Wrap one rendered key image as a Secondary Capture Image.

    ``source`` is the header (a :func:`~node.results.common.source_headers` copy) of
    the image the key image shows, ``frame`` its frame number in a multi-frame source.
    """
    orientation = patient_orientation(source, volume)
    with no_patient_name_warning():
        sc = hd.sc.SCImage(
            pixel_array=image.pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            study_instance_uid=source.StudyInstanceUID,
            # Replaced below: highdicom accepts only single letters here, and the
            # attribute is Type 2 (empty when the source has no orientation).
            patient_orientation=("L", "F"),
            **ctx.identity(ResultKind.SC, number),
        )
    sc.update(patient_study_elements(source))
    sc.PatientOrientation = orientation  # type: ignore[assignment]  # None: empty, Type 2
    sc.ConversionType = "WSD"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.SecondaryCaptureDeviceManufacturer = ctx.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = ctx.device_model_name
    sc.SecondaryCaptureDeviceSoftwareVersions = ctx.software_version
    sc.DerivationDescription = _derivation_description(prediction, ctx)
    sc.SourceImageSequence = [_image_reference(source, frame, purpose=True)]
    sc.ReferencedImageSequence = [_image_reference(source, frame, purpose=False)]
    for keyword in ("BodyPartExamined", "Laterality", "ImageLaterality"):
        if source.get(keyword):
            setattr(sc, keyword, source.get(keyword))
    if "BodyPartExamined" not in sc and "Laterality" not in sc:
        sc.Laterality = None  # type: ignore[assignment]  # Type 2C, empty: body part unknown
    return sc


def build_sc(
    sources: Sequence[Dataset],
    volume: Volume,
    prediction: Prediction,
    ctx: ResultContext,
    max_images: int = 3,
) -> list[Dataset]:
    """Return the secondary-capture "AI result" images of ``prediction`` (see module docstring).

    ``sources`` are the source slices in volume order (or one multi-frame image, or
    one radiograph) and ``volume`` the model's input built from them: CT in HU, a
    radiograph as (1, rows, cols) display-ready [0, 1]. One image for a radiograph;
    up to ``max_images`` key slices for a CT. Image ``n`` (1-based) has Instance
    Number ``n`` and SOP Instance UID ``ctx.instance_uid(ResultKind.SC, n)`` in the
    series ``ctx.uids(ResultKind.SC)[0]``. Raises ``ValueError`` or ``TypeError``
    when the prediction does not match the volume or the volume the sources.
    """
    if not isinstance(ctx, ResultContext):
        raise TypeError(f"expected ResultContext, got {type(ctx).__name__}")
    headers = source_headers(sources)
    _check_inputs(volume, prediction, max_images)
    slice_sources = _source_for_slices(headers, volume)
    results: list[Dataset] = []
    for number, image in enumerate(render_key_images(volume, prediction, ctx, max_images),
                                   start=1):
        source, frame = slice_sources[image.slice_index]
        results.append(
            sc_dataset(image, number, source, frame, volume, prediction, ctx)
        )
    return results
