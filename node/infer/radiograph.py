"""Turn a projection radiograph (CR, DX, secondary capture) into the display-ready image.

:func:`radiograph_to_volume` returns a :class:`models.base.Volume` whose array is
(1, rows, cols) float32 in [0, 1], 1 = white, i.e. the grey levels a DICOM viewer shows by
default (bones bright on a chest film). The steps follow the DICOM grayscale pipeline
(PS3.3 C.11, PS3.4 N.2.1):

1. decode the pixel data (pydicom with the pylibjpeg / openjpeg / libjpeg / pyjpegls plug-ins);
2. Modality LUT: the Modality LUT Sequence if present, else Rescale Slope / Intercept;
3. VOI: the first VOI LUT Sequence item if present, else the first Window Center / Width pair
   (with VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID); without either, 8-bit data is
   taken as already display-ready (0 .. 255), and deeper data gets a 0.5-99.5 percentile
   window;
4. polarity: MONOCHROME1 is inverted; so is MONOCHROME2 with Presentation LUT Shape INVERSE
   (for MONOCHROME1, INVERSE is the standard's way of restating the same inversion, so the
   image is inverted once);
5. colour images (RGB, YBR_*, PALETTE COLOR) are converted to RGB and then to luma
   (ITU-R BT.601 weights), scaled by the largest stored value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
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


def _grey_to_display(pixels: npt.NDArray[Any], ds: Dataset, photometric: str) -> FloatArray:
    """Modality LUT, VOI, polarity: stored values -> [0, 1] with 1 = white."""
    values, transformed = _modality_lut(pixels, ds)
    display = _voi(values, ds, transformed)
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        display = 1.0 - display
    return display


def _lut(item: Dataset, ds: Dataset, what: str) -> tuple[int, int, FloatArray]:
    """Parse a LUT item: (first mapped value, bits per entry, entries as float)."""
    try:
        descriptor = [int(v) for v in item.LUTDescriptor]
        n_entries, first, bits = descriptor[0] or 65536, descriptor[1], descriptor[2]
        element = item["LUTData"]
        raw = element.value
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise UnsupportedInput(f"invalid {what}: {exc}") from exc
    if isinstance(raw, bytes | bytearray):
        _implicit, little = ds.original_encoding
        dtype = "<u2" if little in (None, True) else ">u2"
        data = np.frombuffer(bytes(raw[: len(raw) // 2 * 2]), dtype=dtype).astype(np.float64)
    else:
        data = np.asarray(list(raw) if not isinstance(raw, int) else [raw], dtype=np.float64)
    data = data[:n_entries]
    if data.size == 0:
        raise UnsupportedInput(f"empty {what}")
    # The first value is US or SS depending on the pixel representation.
    if first >= 32768 and int(ds.get("PixelRepresentation", 0) or 0) == 1:
        first -= 65536
    return first, bits, data


def _apply_lut(values: FloatArray, first: int, data: FloatArray) -> FloatArray:
    """Look ``values`` up in a LUT: below the first entry -> first, above the last -> last."""
    index = np.clip(np.rint(values) - first, 0, data.size - 1).astype(np.int64)
    out: FloatArray = data[index]
    return out


def _modality_lut(pixels: npt.NDArray[Any], ds: Dataset) -> tuple[FloatArray, bool]:
    """Stored values -> modality values; the flag says whether anything was applied."""
    values = pixels.astype(np.float64)
    seq = ds.get("ModalityLUTSequence")
    if seq:
        first, _bits, data = _lut(seq[0], ds, "Modality LUT Sequence")
        return _apply_lut(values, first, data), True
    slope = _first_float(ds.get("RescaleSlope"))
    intercept = _first_float(ds.get("RescaleIntercept"))
    slope = 1.0 if slope is None or slope == 0.0 else slope
    intercept = 0.0 if intercept is None else intercept
    if slope != 1.0 or intercept != 0.0:
        return values * slope + intercept, True
    return values, False


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


def _voi(values: FloatArray, ds: Dataset, transformed: bool) -> FloatArray:
    """Modality values -> [0, 1] via VOI LUT, window, or a fallback range."""
    seq = ds.get("VOILUTSequence")
    if seq:
        first, bits, data = _lut(seq[0], ds, "VOI LUT Sequence")
        top = float(2**bits - 1) if 1 <= bits <= 16 else float(data.max())
        if data.max() > top:  # descriptor understates the depth (a known vendor error)
            top = float(2 ** math.ceil(math.log2(data.max() + 1)) - 1)
        return _apply_lut(values, first, data) / max(top, 1.0)
    center = _first_float(ds.get("WindowCenter"))
    width = _first_float(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        return window(values, center, width, function)
    bits_stored = int(ds.get("BitsStored", 8) or 8)
    if bits_stored <= 8 and not transformed:
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        lo = -(2.0 ** (bits_stored - 1)) if signed else 0.0
        hi = lo + 2.0**bits_stored - 1
    else:
        lo, hi = (float(v) for v in np.percentile(values, PERCENTILE_WINDOW))
    if hi <= lo:
        return np.zeros_like(values)
    scaled: FloatArray = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return scaled


def window(values: FloatArray, center: float, width: float, function: str = "LINEAR") -> FloatArray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) with output scaled to [0, 1].

    ``function`` is the VOI LUT Function: LINEAR (default, also for unknown values),
    LINEAR_EXACT or SIGMOID.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    out: FloatArray
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700.0, 700.0)))
        return out
    if function == "LINEAR_EXACT":
        out = np.clip((values - center) / width + 0.5, 0.0, 1.0)
        return out
    if width <= 1.0:  # LINEAR requires width >= 1; width 1 is a threshold at center - 0.5
        out = (values > center - 0.5).astype(np.float64)
        return out
    out = np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    return out


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
