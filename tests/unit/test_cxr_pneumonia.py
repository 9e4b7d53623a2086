"""Tests of the built-in ``cxr-pneumonia`` model and of ``node.infer.radiograph``."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import (
    apply_modality_lut,
    apply_presentation_lut,
    apply_voi,
    apply_voi_lut,
)
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from models.base import (
    WEIGHTS_HASH_DIGITS,
    ModelError,
    UnsupportedInput,
    Volume,
    WeightsError,
    sha256_file,
)
from models.cxr_pneumonia import (
    METRICS_FILENAME,
    PNEUMONIA,
    CxrPneumoniaModel,
    default_weights_path,
    read_weights,
    save_weights,
)
from models.training.train_cxr_pneumonia import roc_auc, youden_threshold
from node.infer.radiograph import radiograph_to_volume, window
from tests.peers import SAMPLES, SHARED

CXR_DIR = SAMPLES / "chest-xray"
CXR_FILES = (
    "RG1_J2KI.dcm",
    "RG1_JLSN.dcm",
    "DX_chest_PA_Canon_966_fixed.dcm",
    "NIH_CXR14_SC_Covid0000.dcm",
)
MNIST = SHARED / "datasets" / "pneumoniamnist.npz"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model() -> CxrPneumoniaModel:
    m = CxrPneumoniaModel()
    m.load("cpu")
    return m


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        default_weights_path().with_name(METRICS_FILENAME).read_text()
    )
    return data


@pytest.fixture(scope="module")
def real_volumes() -> Iterator[dict[str, Volume]]:
    yield {name: radiograph_to_volume(pydicom.dcmread(CXR_DIR / name)) for name in CXR_FILES}


def volume_28(image: npt.NDArray[np.uint8]) -> Volume:
    return Volume(
        array=(image.astype(np.float32) / 255.0)[None], spacing=(1.0, 1.0, 1.0), modality="CR"
    )


def make_ds(
    pixels: npt.NDArray[Any],
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **attrs: Any,
) -> Dataset:
    """A minimal uncompressed DX dataset holding ``pixels``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def ramp16() -> npt.NDArray[np.uint16]:
    return np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 17


# --------------------------------------------------------------------------- (a) shipped weights


def test_shipped_weights_reproduce_recorded_probabilities(
    model: CxrPneumoniaModel, recorded: dict[str, Any]
) -> None:
    ref = recorded["reference_predictions"]
    shape = tuple(ref["images_shape"])
    images = np.frombuffer(base64.b64decode(ref["images_uint8_base64"]), dtype=np.uint8)
    images = images.reshape(shape)
    got = [model.predict(volume_28(img)).findings[0].probability for img in images]
    np.testing.assert_allclose(got, ref["probabilities"], atol=1e-4, rtol=0)
    # Probabilities near 0 or 1 hide small changes; the logits do not.
    logits = [model.logit(volume_28(img)) for img in images]
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-3, rtol=0)
    if MNIST.is_file():  # the stored images are the test split's images at those indices
        with np.load(MNIST) as data:
            np.testing.assert_array_equal(data["test_images"][ref["indices"]], images)


def test_weights_file_matches_metrics(model: CxrPneumoniaModel, recorded: dict[str, Any]) -> None:
    assert recorded["weights_sha256"] == sha256_file(default_weights_path())
    version = f"1.0.0+sha256:{recorded['weights_sha256'][:WEIGHTS_HASH_DIGITS]}"
    assert model.algorithm_version == version
    assert recorded["algorithm_version"] == version
    assert recorded["test"]["auc"] >= 0.97
    assert default_weights_path().stat().st_size < 2_000_000
    assert model.threshold == pytest.approx(recorded["threshold"])


def test_prediction_finding(model: CxrPneumoniaModel) -> None:
    img = (np.linspace(0, 255, 28 * 28).reshape(28, 28)).astype(np.uint8)
    pred = model.predict(volume_28(img))
    assert len(pred.findings) == 1 and not pred.segments and not pred.measurements
    finding = pred.findings[0]
    assert finding.name == PNEUMONIA
    assert 0.0 <= finding.probability <= 1.0
    assert finding.threshold == model.threshold


def test_input_validation(model: CxrPneumoniaModel) -> None:
    good = np.zeros((1, 40, 30), dtype=np.float32)
    with pytest.raises(UnsupportedInput):
        model.predict(Volume(array=good, spacing=(1.0, 1.0, 1.0), modality="CT"))
    with pytest.raises(UnsupportedInput):
        model.predict(
            Volume(array=np.zeros((2, 40, 30), np.float32), spacing=(1.0, 1.0, 1.0), modality="DX")
        )
    bad = good.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ModelError):
        model.predict(Volume(array=bad, spacing=(1.0, 1.0, 1.0), modality="DX"))
    with pytest.raises(ModelError):
        CxrPneumoniaModel().predict(Volume(array=good, spacing=(1.0, 1.0, 1.0), modality="DX"))


# --------------------------------------------------------------------------- (b) real radiographs


@pytest.mark.parametrize("name", CXR_FILES)
def test_real_radiograph(
    name: str, real_volumes: dict[str, Volume], model: CxrPneumoniaModel
) -> None:
    ds = pydicom.dcmread(CXR_DIR / name, stop_before_pixels=True)
    vol = real_volumes[name]
    arr = vol.array
    assert arr.shape == (1, ds.Rows, ds.Columns) and arr.dtype == np.float32
    assert float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0
    assert float(arr.std()) > 0.05
    # Display polarity: bones / mediastinum bright, aerated lungs dark (MONOCHROME1 inverted).
    rows, cols = arr.shape[1:]
    band = arr[0, int(0.3 * rows) : int(0.6 * rows)]
    lungs = np.concatenate(
        [
            band[:, int(0.2 * cols) : int(0.35 * cols)].ravel(),
            band[:, int(0.65 * cols) : int(0.8 * cols)].ravel(),
        ]
    ).mean()
    mediastinum = band[:, int(0.45 * cols) : int(0.55 * cols)].mean()
    assert lungs < mediastinum - 0.1
    model.check_input(vol)
    p = model.predict(vol).findings[0].probability
    assert 0.0 <= p <= 1.0


def test_real_radiograph_metadata(real_volumes: dict[str, Volume]) -> None:
    # RG1 has PixelSpacing 0\0 (invalid) -> 1 mm; the Canon DX has 0.16 mm.
    assert real_volumes["RG1_J2KI.dcm"].spacing == (1.0, 1.0, 1.0)
    assert real_volumes["DX_chest_PA_Canon_966_fixed.dcm"].spacing == (1.0, 0.16, 0.16)
    assert real_volumes["RG1_J2KI.dcm"].modality == "CR"
    assert real_volumes["RG1_J2KI.dcm"].body_part == "CHEST"
    assert real_volumes["NIH_CXR14_SC_Covid0000.dcm"].modality == "DX"


def test_rg1_codecs_agree(real_volumes: dict[str, Volume], model: CxrPneumoniaModel) -> None:
    j2k, jls = real_volumes["RG1_J2KI.dcm"], real_volumes["RG1_JLSN.dcm"]
    assert float(np.abs(j2k.array - jls.array).mean()) < 0.01
    p_j2k = model.predict(j2k).findings[0].probability
    p_jls = model.predict(jls).findings[0].probability
    assert abs(p_j2k - p_jls) < 0.02


# --------------------------------------------------------------------------- (c) synthetic DICOM


def test_monochrome1_is_inverted_monochrome2() -> None:
    px = ramp16()
    attrs = {"WindowCenter": 20000, "WindowWidth": 30000}
    m2 = radiograph_to_volume(make_ds(px, "MONOCHROME2", **attrs)).array
    m1 = radiograph_to_volume(make_ds(px, "MONOCHROME1", **attrs)).array
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert float(m2.std()) > 0.1
    # MONOCHROME1 + INVERSE (as the standard requires for DX) is inverted once, not twice.
    m1_inv = radiograph_to_volume(
        make_ds(px, "MONOCHROME1", PresentationLUTShape="INVERSE", **attrs)
    ).array
    np.testing.assert_allclose(m1_inv, m1, atol=1e-6)
    m2_inv = radiograph_to_volume(
        make_ds(px, "MONOCHROME2", PresentationLUTShape="INVERSE", **attrs)
    ).array
    np.testing.assert_allclose(m2_inv, m1, atol=1e-6)


def test_linear_window_with_rescale() -> None:
    px = np.array([[0, 100, 200, 300], [400, 500, 600, 4095]], dtype=np.uint16)
    ds = make_ds(
        px,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=[500, 40],
        WindowWidth=[401, 400],
    )
    out = radiograph_to_volume(ds).array[0]
    values = px * 2.0 - 100.0  # modality values
    expected = np.clip((values - 499.5) / 400.0 + 0.5, 0.0, 1.0)  # first window 500 / 401
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0, 0] == 0.0 and out[1, 3] == 1.0


def test_window_functions() -> None:
    v = np.array([0.0, 50.0, 100.0, 150.0, 200.0])
    np.testing.assert_allclose(window(v, 100.0, 100.0, "LINEAR_EXACT"), [0, 0, 0.5, 1, 1])
    sig = window(v, 100.0, 100.0, "SIGMOID")
    assert sig[2] == pytest.approx(0.5) and np.all(np.diff(sig) > 0)
    np.testing.assert_allclose(window(v, 100.0, 1.0), [0, 0, 1, 1, 1])
    ds = make_ds(ramp16(), WindowCenter=20000, WindowWidth=10000, VOILUTFunction="SIGMOID")
    out = radiograph_to_volume(ds).array[0]
    assert 0.0 < float(out.min()) < 0.05 and 0.95 < float(out.max()) < 1.0


def test_voi_lut_sequence() -> None:
    px = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 2, 8]  # 4 entries, first mapped value 2, 8 bits per entry
    item.LUTData = [0, 85, 170, 255]
    ds = make_ds(px, bits_stored=12, WindowCenter=0, WindowWidth=1)
    ds.VOILUTSequence = Sequence([item])
    out = radiograph_to_volume(ds).array[0]  # the LUT wins over the window
    np.testing.assert_allclose(out, [[0, 0, 0, 1 / 3], [2 / 3, 1, 1, 1]], atol=1e-6)


# --------------------------------------------------------------------------- vendor fixes
# Each test shows what pydicom's LUT functions alone make of an input that real files carry,
# and that radiograph_to_volume corrects it.


def ramp12() -> npt.NDArray[np.uint16]:
    return np.arange(4096, dtype=np.uint16).reshape(64, 64)


def lut_sequence(descriptor: list[int], data: list[int]) -> Sequence:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data
    return Sequence([item])


def test_rescale_as_vendors_write_it() -> None:
    px = ramp12()
    expected = window(px + 1000.0, 3000.0, 2000.0)
    zero_slope = make_ds(px, bits_stored=12, RescaleSlope=0, RescaleIntercept=1000)
    no_slope = make_ds(px, bits_stored=12, RescaleIntercept=1000)
    two_slopes = make_ds(px, bits_stored=12, RescaleSlope=[1, 1], RescaleIntercept=1000)
    empty_slope = make_ds(px, bits_stored=12, RescaleSlope="", RescaleIntercept=1000)
    for ds in (zero_slope, no_slope, two_slopes, empty_slope):
        ds.WindowCenter, ds.WindowWidth = 3000, 2000
        np.testing.assert_allclose(radiograph_to_volume(ds).array[0], expected, atol=1e-6)
    # pydicom: a zero slope makes every pixel the intercept (a blank image) ...
    assert np.all(apply_modality_lut(px, zero_slope) == 1000.0)
    # ... an intercept without a slope is ignored ...
    np.testing.assert_array_equal(apply_modality_lut(px, no_slope), px)
    # ... and several or empty values fail.
    with pytest.raises(ValueError, match="broadcast"):
        apply_modality_lut(px, two_slopes)
    with pytest.raises(TypeError):
        apply_modality_lut(px, empty_slope)


def test_lut_first_value_written_unsigned_for_signed_pixels() -> None:
    px = (ramp12().astype(np.int32) - 2048).astype(np.int16)
    # First mapped value -2048, written as the US 63488; 4096 entries 0, 16, ..., 65520.
    ds = make_ds(px, WindowCenter=32768, WindowWidth=65536)
    ds.ModalityLUTSequence = lut_sequence([4096, 65536 - 2048, 16], list(range(0, 65536, 16)))
    expected = window((px + 2048.0) * 16.0, 32768.0, 65536.0)
    np.testing.assert_allclose(radiograph_to_volume(ds).array[0], expected, atol=1e-6)
    with pytest.raises(OverflowError):  # pydicom: 63488 does not fit the int16 pixels
        apply_modality_lut(px, ds)


def test_signed_pixels_through_a_full_range_lut() -> None:
    px = np.array([[-32768, -1, 0, 100, 32767]], dtype=np.int16)
    ds = make_ds(px, WindowCenter=32768, WindowWidth=65536)
    ds.ModalityLUTSequence = lut_sequence([0, -32768, 16], list(range(65536)))
    expected = window(px + 32768.0, 32768.0, 65536.0)
    np.testing.assert_allclose(radiograph_to_volume(ds).array[0], expected, atol=1e-6)
    # pydicom subtracts the first mapped value in int16, which wraps around for px >= 0.
    np.testing.assert_array_equal(apply_modality_lut(px, ds), [[0, 32767, 0, 0, 0]])


def test_lut_bits_per_entry_understated() -> None:
    px = ramp12()
    ds = make_ds(px, bits_stored=12)
    ds.VOILUTSequence = lut_sequence([4096, 0, 8], list(range(4096)))  # 12-bit entries
    np.testing.assert_allclose(radiograph_to_volume(ds).array[0], px / 4095.0, atol=1e-6)
    with pytest.raises(OverflowError):  # pydicom reads the entries as uint8
        apply_voi(px, ds)
    # A Modality LUT must have 8 or 16 bits per entry; some say 12.
    ds = make_ds(px, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    ds.ModalityLUTSequence = lut_sequence([4096, 0, 12], list(range(4095, -1, -1)))
    expected = window(4095.0 - px, 2048.0, 4096.0)
    np.testing.assert_allclose(radiograph_to_volume(ds).array[0], expected, atol=1e-6)
    with pytest.raises(TypeError, match="uint12"):  # pydicom: not a numpy type
        apply_modality_lut(px, ds)


def test_voi_lut_after_a_fractional_rescale() -> None:
    px = ramp12()
    ds = make_ds(px, bits_stored=12, RescaleSlope=1, RescaleIntercept=0.6)
    ds.VOILUTSequence = lut_sequence([4096, 0, 16], list(range(0, 65536, 16)))
    expected = np.minimum(px + 1, 4095) * 16 / 65535.0  # x + 0.6 rounds to x + 1
    np.testing.assert_allclose(radiograph_to_volume(ds).array[0], expected, atol=1e-6)
    with pytest.warns(UserWarning, match="float"):  # pydicom truncates float input
        truncated = apply_voi(apply_modality_lut(px, ds), ds)
    np.testing.assert_array_equal(truncated, px * 16)


def test_window_as_vendors_write_it() -> None:
    px = ramp12()
    linear = radiograph_to_volume(make_ds(px, bits_stored=12, WindowCenter=2048,
                                          WindowWidth=1024)).array[0]
    for function in ("", "LIN"):  # empty, or not a defined term: LINEAR
        ds = make_ds(px, bits_stored=12, WindowCenter=2048, WindowWidth=1024,
                     VOILUTFunction=function)
        np.testing.assert_array_equal(radiograph_to_volume(ds).array[0], linear)
        with pytest.raises(ValueError, match="VOI LUT Function"):
            apply_voi_lut(px, ds)
    thin = make_ds(px, bits_stored=12, WindowCenter=2048, WindowWidth=0.5)  # LINEAR needs >= 1
    np.testing.assert_array_equal(radiograph_to_volume(thin).array[0], px > 2047.5)
    with pytest.raises(ValueError, match="Window Width"):
        apply_voi_lut(px, thin)
    # A zero width or an empty center is no window: the image is shown as without one.
    unwindowed = radiograph_to_volume(make_ds(px, bits_stored=12)).array[0]
    zero = make_ds(px, bits_stored=12, WindowCenter=2048, WindowWidth=0)
    empty = make_ds(px, bits_stored=12, WindowCenter="", WindowWidth=1024)
    for ds in (zero, empty):
        np.testing.assert_array_equal(radiograph_to_volume(ds).array[0], unwindowed)
    with pytest.raises(ValueError, match="Window Width"):
        apply_voi_lut(px, zero)
    with pytest.raises(TypeError):
        apply_voi_lut(px, empty)


def test_inverse_is_against_white_not_the_image_maximum() -> None:
    px = ramp12()
    attrs: dict[str, Any] = {"WindowCenter": 2048, "WindowWidth": 8192}
    plain = radiograph_to_volume(make_ds(px, bits_stored=12, **attrs)).array[0]
    assert float(plain.min()) > 0.2 and float(plain.max()) < 0.8  # neither black nor white
    inverse = make_ds(px, bits_stored=12, PresentationLUTShape="INVERSE", **attrs)
    np.testing.assert_allclose(radiograph_to_volume(inverse).array[0], 1.0 - plain, atol=1e-6)
    # pydicom inverts against the image's own maximum: its brightest pixel becomes black.
    by_pydicom = apply_presentation_lut(plain, inverse)
    assert float(by_pydicom.min()) == 0.0
    assert not np.allclose(by_pydicom, 1.0 - plain, atol=0.1)


def test_bit_depths_without_voi() -> None:
    px8 = np.array([[0, 64], [128, 255]], dtype=np.uint8)
    out8 = radiograph_to_volume(make_ds(px8)).array[0]
    np.testing.assert_allclose(out8, px8 / 255.0, atol=1e-6)  # 8-bit is display-ready
    px8_low = np.array([[10, 20], [30, 40]], dtype=np.uint8)
    np.testing.assert_allclose(
        radiograph_to_volume(make_ds(px8_low)).array[0], px8_low / 255.0, atol=1e-6
    )
    px16 = (ramp16().astype(np.uint32) * 3 // 4 + 1000).astype(np.uint16)
    out16 = radiograph_to_volume(make_ds(px16, bits_stored=16)).array[0]
    assert out16.min() == 0.0 and out16.max() == 1.0  # percentile window
    assert np.all(np.diff(out16.ravel()) >= 0)  # monotonic ramp stays monotonic
    assert 0.45 < float(out16.mean()) < 0.55
    # a signed 16-bit image with a window
    signed = (ramp16().astype(np.int32) - 20000).astype(np.int16)
    outs = radiograph_to_volume(make_ds(signed, WindowCenter=0, WindowWidth=2000)).array[0]
    assert outs.min() == 0.0 and outs.max() == 1.0


def test_rgb_to_grey_and_no_file_meta() -> None:
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    rgb[2:, :, :] = 255
    ds = make_ds(rgb, "RGB")
    out = radiograph_to_volume(ds).array[0]
    np.testing.assert_allclose(out[:2], 0.299, atol=1e-6)
    np.testing.assert_allclose(out[2:], 1.0, atol=1e-6)
    grey = make_ds(np.array([[0, 255]], dtype=np.uint8))
    del grey.file_meta  # e.g. a dataset received over the network
    np.testing.assert_allclose(radiograph_to_volume(grey).array[0], [[0.0, 1.0]])


def test_spacing() -> None:
    px = np.zeros((4, 4), dtype=np.uint8)
    assert radiograph_to_volume(make_ds(px, PixelSpacing=[0, 0])).spacing == (1.0, 1.0, 1.0)
    ds = make_ds(px, PixelSpacing=[0, 0], ImagerPixelSpacing=[0.2, 0.15])
    assert radiograph_to_volume(ds).spacing == (1.0, 0.2, 0.15)
    ds = make_ds(px, PixelSpacing=[0.1, 0.1], ImagerPixelSpacing=[0.2, 0.2])
    assert radiograph_to_volume(ds).spacing == (1.0, 0.1, 0.1)


def test_unsupported_inputs() -> None:
    no_pixels = Dataset()
    no_pixels.Modality = "SR"
    with pytest.raises(UnsupportedInput, match="Pixel Data"):
        radiograph_to_volume(no_pixels)
    frames = np.zeros((3, 8, 8), dtype=np.uint8)
    multi = make_ds(frames)
    assert int(multi.NumberOfFrames) == 3
    with pytest.raises(UnsupportedInput, match="multi-frame"):
        radiograph_to_volume(multi)
    broken = make_ds(np.zeros((8, 8), dtype=np.uint16))
    broken.PixelData = broken.PixelData[:10]
    with pytest.raises(UnsupportedInput, match="decode"):
        radiograph_to_volume(broken)


# --------------------------------------------------------------------------- (d) heatmap


def test_heatmap(real_volumes: dict[str, Volume], model: CxrPneumoniaModel) -> None:
    vol = real_volumes["RG1_J2KI.dcm"]
    heat = model.heatmap(vol)
    assert heat.shape == vol.array.shape[1:] and heat.dtype == np.float32
    assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0
    assert float(heat.std()) > 0.01
    small = model.heatmap(
        Volume(
            array=np.random.default_rng(0).random((1, 50, 37), dtype=np.float32),
            spacing=(1.0, 1.0, 1.0),
            modality="DX",
        )
    )
    assert small.shape == (50, 37)


# --------------------------------------------------------------------------- (e) versioning


def test_algorithm_version_tracks_weights(tmp_path: Path, model: CxrPneumoniaModel) -> None:
    digest = sha256_file(default_weights_path())
    assert model.weights_sha256 == digest
    assert model.algorithm_version == f"1.0.0+sha256:{digest[:16]}"
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(default_weights_path(), copy)
    assert CxrPneumoniaModel(copy).algorithm_version == model.algorithm_version
    net, meta = read_weights(default_weights_path())
    with_other_meta = tmp_path / "other.safetensors"
    save_weights(net, with_other_meta, meta, extra={"note": "re-saved for a test"})
    other = CxrPneumoniaModel(with_other_meta)
    other.load("cpu")
    assert other.algorithm_version.startswith("1.0.0+sha256:")
    assert other.algorithm_version != model.algorithm_version
    assert other.algorithm_version == f"1.0.0+sha256:{sha256_file(with_other_meta)[:16]}"
    with pytest.raises(WeightsError):
        CxrPneumoniaModel(tmp_path / "missing.safetensors").load("cpu")
    with pytest.raises(WeightsError):
        _ = CxrPneumoniaModel(tmp_path / "missing.safetensors").weights_sha256


# --------------------------------------------------------------------------- metrics helpers


def test_roc_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # rounded: many ties
    pos, neg = s[y == 1], s[y == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(y, s) == pytest.approx(pairwise)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    t = youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.6, 0.9])
    assert 0.2 < t < 0.6
