"""Turn a projection radiograph (CR, DX, secondary capture) into the display-ready image.

:func:`radiograph_to_volume` returns a :class:`models.base.Volume` whose array is
(1, rows, cols) float32 in [0, 1], 1 = white, i.e. the grey levels a DICOM viewer shows by
default (bones bright on a chest film). The steps follow the DICOM grayscale pipeline
(PS3.3 C.11, PS3.4 N.2.1):

1. decode the pixel data (pydicom with the pylibjpeg / openjpeg / libjpeg / pyjpegls plug-ins);
2. Modality LUT (pydicom ``apply_modality_lut``): the Modality LUT Sequence if present, else
   Rescale Slope / Intercept;
3. VOI: the first VOI LUT Sequence item if present (pydicom ``apply_voi``), else the first
   Window Center / Width pair with VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID (pydicom
   ``apply_windowing``); without either, 8-bit data is taken as already display-ready
   (0 .. 255), and deeper data gets a 0.5-99.5 percentile window;
4. polarity: MONOCHROME1 is inverted; so is MONOCHROME2 with Presentation LUT Shape INVERSE
   (for MONOCHROME1, INVERSE is the standard's way of restating the same inversion, so the
   image is inverted once);
5. colour images (RGB, YBR_*, PALETTE COLOR) are converted to RGB and then to luma
   (ITU-R BT.601 weights), scaled by the largest stored value.

pydicom gets the attributes it reads through a separate dataset, with the vendor errors it
does not handle corrected: see :func:`_rescale`, :func:`_lut_item`, :func:`_lut_top` and
:func:`window`. A LUT item pydicom cannot read makes the image unsupported.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
)
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from models.base import UnsupportedInput, Volume

FloatArray = npt.NDArray[np.float64]

GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
PALETTE = "PALETTE COLOR"

PERCENTILE_WINDOW = (0.5, 99.5)
"""Percentiles used as the window when a >8-bit image carries no VOI information."""

LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def radiograph_to_volume(ds: Dataset) -> Volume:
    """Decode a single-frame radiograph into a display-ready (1, rows, cols) [0, 1] Volume.

    ``spacing`` is (1.0, row spacing, column spacing) in mm, from Pixel Spacing, else Imager
    Pixel Spacing, else Nominal Scanned Pixel Spacing; a missing or invalid value (such as
    ``0\\0``) gives 1.0 mm. Raises :class:`UnsupportedInput` for a dataset without image
    pixels, a multi-frame image, float pixel data, an unknown photometric interpretation or
    pixel data that cannot be decoded.
    """
    photometric = _check_image(ds)
    pixels = _decode(ds)
    if photometric in GREY:
        image = _grey_to_display(pixels, ds, photometric)
    else:
        image = _colour_to_grey(pixels, ds, photometric)
    image = np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0)
    row_mm, col_mm = _pixel_spacing(ds)
    return Volume(
        array=image.astype(np.float32)[np.newaxis],
        spacing=(1.0, row_mm, col_mm),
        modality=str(ds.get("Modality", "") or ""),
        slice_uids=(str(ds.get("SOPInstanceUID", "") or ""),),
        body_part=str(ds.get("BodyPartExamined", "") or "").upper(),
    )


# --------------------------------------------------------------------------- checks, decoding


def _check_image(ds: Dataset) -> str:
    """Reject what is not a single-frame 2-D image; return the photometric interpretation."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedInput("float pixel data is not a radiograph")
        raise UnsupportedInput("dataset has no Pixel Data (not an image)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or cols < 1:
        raise UnsupportedInput(f"invalid image size {rows}x{cols}")
    frames_raw = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames_raw) if frames_raw not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise UnsupportedInput(f"invalid Number of Frames {frames_raw!r}") from exc
    if frames != 1:
        raise UnsupportedInput(f"multi-frame image ({frames} frames); expected one radiograph")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric in GREY or photometric == PALETTE:
        if samples != 1:
            raise UnsupportedInput(f"{photometric} with {samples} samples per pixel")
    elif photometric in COLOUR:
        if samples != 3:
            raise UnsupportedInput(f"{photometric} with {samples} samples per pixel")
    else:
        raise UnsupportedInput(f"unsupported Photometric Interpretation {photometric!r}")
    return photometric


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax; for a dataset without file meta, from how it was read."""
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if ts:
        return UID(str(ts))
    implicit, _little = ds.original_encoding
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _decode(ds: Dataset) -> npt.NDArray[Any]:
    """Decode the one frame; YBR colour is converted to RGB. Does not modify ``ds``."""
    ts = _transfer_syntax(ds)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise UnsupportedInput(f"no pixel decoder for transfer syntax {ts.name} ({ts})") from exc
    try:
        options: dict[str, Any] = {"as_rgb": True}  # YBR -> RGB
        arr, _meta = decoder.as_array(ds, index=0, **options)
    except Exception as exc:  # decoders raise many types: ValueError, RuntimeError, ...
        raise UnsupportedInput(
            f"cannot decode pixel data ({ts.name}): {type(exc).__name__}: {exc}"
        ) from exc
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] == 1:  # some decoders keep a frame axis
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise UnsupportedInput(f"unexpected decoded pixel array shape {arr.shape}")
    return arr


# --------------------------------------------------------------------------- grey pipeline

LUT_ERRORS = (AttributeError, IndexError, KeyError, TypeError, ValueError, struct.error)
"""What pydicom's LUT functions raise on a malformed LUT item."""


def _grey_to_display(pixels: npt.NDArray[Any], ds: Dataset, photometric: str) -> FloatArray:
    """Modality LUT, VOI, polarity: stored values -> [0, 1] with 1 = white."""
    values, transformed = _modality_lut(pixels, ds)
    display = _voi(values, ds, transformed)
    if _inverted(ds, photometric):
        display = 1.0 - display
    return display


def _lut_view(ds: Dataset) -> Dataset:
    """An empty dataset with ``ds``'s transfer syntax, to hand pydicom corrected attributes.

    ``ds`` itself is neither changed nor passed: pydicom's LUT functions write to the dataset
    they are given. They read the byte order of OW LUT Data from its transfer syntax.
    """
    view = Dataset()
    view.file_meta = FileMetaDataset()
    view.file_meta.TransferSyntaxUID = _transfer_syntax(ds)
    return view


def _lut_item(item: Dataset, ds: Dataset, what: str) -> Dataset:
    """A Modality or VOI LUT item as pydicom must read it; two vendor fixes.

    * The first mapped value is US or SS as the pixel data are unsigned or signed. Some
      vendors write it as US for signed pixels (65535 for -1): pydicom then maps every pixel
      to the first entry, or fails. A value of 32768 or more with signed pixels is read as SS.
    * pydicom reads the entries into an integer type of the descriptor's bits per entry,
      which fails when a vendor understates them (8 bits for 12-bit entries) or writes a
      depth numpy has no type for (12 bits in a Modality LUT). Entries are read as 16-bit.
    """
    try:
        count, first, _bits = (int(v) for v in item.LUTDescriptor)
        data = item["LUTData"]
    except LUT_ERRORS as exc:
        raise UnsupportedInput(f"invalid {what}: {exc}") from exc
    if first >= 1 << 15 and int(ds.get("PixelRepresentation", 0) or 0) == 1:
        first -= 1 << 16
    fixed = Dataset()
    fixed.LUTDescriptor = [count, first, 16]
    fixed[data.tag] = data
    return fixed


def _modality_lut(pixels: npt.NDArray[Any], ds: Dataset) -> tuple[npt.NDArray[Any], bool]:
    """Stored values -> modality values (pydicom); the flag says whether anything was applied."""
    view = _lut_view(ds)
    seq = ds.get("ModalityLUTSequence")
    if seq:
        view.ModalityLUTSequence = [_lut_item(seq[0], ds, "Modality LUT Sequence")]
        # pydicom subtracts the first mapped value in the pixels' own type: int16 pixels
        # and a first value of -32768 would wrap around.
        pixels = pixels.astype(np.int64)
    else:
        rescale = _rescale(ds)
        if rescale is None:
            return pixels, False
        view.RescaleSlope, view.RescaleIntercept = rescale
    try:
        return apply_modality_lut(pixels, view), True
    except LUT_ERRORS as exc:
        raise UnsupportedInput(f"invalid Modality LUT Sequence: {exc}") from exc


def _rescale(ds: Dataset) -> tuple[float, float] | None:
    """(Rescale Slope, Rescale Intercept) as vendors write them; None for the identity.

    Vendor fixes: pydicom needs both, and multiplies by whatever is there. A missing or zero
    slope is taken as 1 (pydicom ignores an intercept without a slope, and a zero slope gives
    a blank image), a missing intercept as 0, and of several values (``1\\1``) or an empty
    or invalid one only a first finite number counts (pydicom fails on them).
    """
    slope = _first_float(ds.get("RescaleSlope")) or 1.0
    intercept = _first_float(ds.get("RescaleIntercept")) or 0.0
    if slope == 1.0 and intercept == 0.0:
        return None
    return slope, intercept


def _first_float(value: object) -> float | None:
    """First value of a (possibly multi-valued) DS/IS element as a finite float, else None."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0] if len(value) > 0 else None
    if value is None or value == "":
        return None
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _voi(values: npt.NDArray[Any], ds: Dataset, transformed: bool) -> FloatArray:
    """Modality values -> [0, 1] via VOI LUT, window, or a fallback range."""
    seq = ds.get("VOILUTSequence")
    if seq:
        return _voi_lut(values, ds, seq[0])
    center = _first_float(ds.get("WindowCenter"))
    width = _first_float(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "") or "").strip().upper()
        return window(values, center, width, function)
    bits_stored = int(ds.get("BitsStored", 8) or 8)
    if bits_stored <= 8 and not transformed:
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        lo = -(2.0 ** (bits_stored - 1)) if signed else 0.0
        hi = lo + 2.0**bits_stored - 1
    else:
        lo, hi = (float(v) for v in np.percentile(values, PERCENTILE_WINDOW))
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float64)
    scaled: FloatArray = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return scaled


def _voi_lut(values: npt.NDArray[Any], ds: Dataset, item: Dataset) -> FloatArray:
    """Apply a VOI LUT Sequence item (pydicom) and scale its output to [0, 1].

    The modality values are rounded to integers first: pydicom truncates float input (and
    warns), and a rescaled image is float even when its values are whole.
    """
    view = _lut_view(ds)
    view.VOILUTSequence = [_lut_item(item, ds, "VOI LUT Sequence")]
    count, first, _ = view.VOILUTSequence[0].LUTDescriptor
    if not np.issubdtype(values.dtype, np.integer):
        values = np.rint(values).astype(np.int64)
    try:
        # Every input the table maps gives its entries, as pydicom reads them.
        entries = apply_voi(np.arange(first, first + (count or 1 << 16)), view)
        out: FloatArray = apply_voi(values, view) / _lut_top(item, entries)
    except LUT_ERRORS as exc:
        raise UnsupportedInput(f"invalid VOI LUT Sequence: {exc}") from exc
    return out


def _lut_top(item: Dataset, entries: npt.NDArray[Any]) -> float:
    """The white of a VOI LUT: the largest value of its bits per entry.

    Vendor fix: a descriptor that understates the bits per entry (8 for 12-bit entries) would
    give values above 1; the white is then that of the depth the entries need.
    """
    bits = int(item.LUTDescriptor[2])
    peak = float(entries.max())
    top = float(2**bits - 1) if 1 <= bits <= 16 else peak
    if peak > top:
        top = float(2 ** math.ceil(math.log2(peak + 1)) - 1)
    return max(top, 1.0)


def window(
    values: npt.NDArray[Any], center: float, width: float, function: str = "LINEAR"
) -> FloatArray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) by pydicom's ``apply_windowing``, output in [0, 1].

    ``function`` is the VOI LUT Function: LINEAR_EXACT, SIGMOID, else LINEAR. Vendor fixes
    (pydicom raises ValueError on both): an empty or unknown function is taken as LINEAR, and
    a LINEAR width below 1 as 1, a threshold at ``center - 0.5``.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    if function not in ("LINEAR_EXACT", "SIGMOID"):
        function, width = "LINEAR", max(width, 1.0)
    params = Dataset()
    params.PhotometricInterpretation = "MONOCHROME2"
    # apply_windowing maps onto the range of the stored values: one unsigned bit is [0, 1].
    params.BitsStored, params.PixelRepresentation = 1, 0
    params.WindowCenter, params.WindowWidth, params.VOILUTFunction = center, width, function
    with np.errstate(over="ignore"):  # SIGMOID far below the center: exp overflows, 1/inf = 0
        out: FloatArray = apply_windowing(np.asarray(values), params)
    return out


def _inverted(ds: Dataset, photometric: str) -> bool:
    """Whether black and white swap: MONOCHROME1, or Presentation LUT Shape INVERSE.

    For MONOCHROME1, INVERSE restates the same inversion (as DX requires), so the image is
    inverted once. pydicom's ``apply_presentation_lut`` does not fit: it inverts against the
    image's own maximum (``arr.max() - arr``) rather than the white of the VOI output, so an
    image without a white pixel would come out darker, and it does not know MONOCHROME1.
    """
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


# --------------------------------------------------------------------------- colour


def _colour_to_grey(pixels: npt.NDArray[Any], ds: Dataset, photometric: str) -> FloatArray:
    """RGB / YBR (already decoded to RGB) / palette colour -> luma in [0, 1]."""
    if photometric == PALETTE:
        try:
            rgb = np.asarray(apply_color_lut(pixels, ds), dtype=np.float64)
        except Exception as exc:  # malformed palette descriptors raise various errors
            raise UnsupportedInput(f"cannot apply the colour palette: {exc}") from exc
        top = 65535.0 if rgb.max() > 255 else 255.0
    else:
        rgb = pixels.astype(np.float64)
        bits = int(ds.get("BitsStored", 8) or 8)
        top = float(2**bits - 1)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise UnsupportedInput(f"unexpected colour array shape {rgb.shape}")
    luma: FloatArray = rgb @ np.asarray(LUMA_WEIGHTS, dtype=np.float64)
    return luma / top


# --------------------------------------------------------------------------- geometry


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """(row, column) spacing in mm from the first valid spacing attribute, else (1.0, 1.0)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            pair = [float(v) for v in value]
        except (TypeError, ValueError):
            continue
        if len(pair) == 2 and all(math.isfinite(v) and v > 0 for v in pair):
            return pair[0], pair[1]
    return 1.0, 1.0
