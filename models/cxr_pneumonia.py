"""Built-in ``cxr-pneumonia`` model: a small CNN on 28x28 chest radiographs (PneumoniaMNIST).

Research demonstration only. The network was trained on PneumoniaMNIST (MedMNIST v2), which is
derived from the paediatric chest X-rays of Kermany et al. (2018); it is NOT for clinical use.
See ``MODEL_CARD_cxr_pneumonia.md`` next to this file.

The module holds:

* :class:`CxrNet`, the network (shared with :mod:`models.training.train_cxr_pneumonia`);
* :func:`to_model_grid`, the inference preprocessing that reproduces how MedMNIST built the
  28x28 images (center-crop to a square of the short edge, then resize);
* :func:`read_weights` / :func:`save_weights`, the safetensors file with its metadata;
* :class:`CxrPneumoniaModel`, the plug-in that implements :class:`models.base.Model`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.base import (
    Code,
    Finding,
    Heatmap,
    InputSpec,
    Model,
    ModelError,
    Prediction,
    UnsupportedInput,
    Volume,
    WeightsError,
    sha256_file,
)

ARCHITECTURE = "cxrnet-v1"
"""Architecture identifier written into (and checked from) the weights metadata."""

WIDTHS: tuple[int, int, int] = (24, 48, 96)
"""Channels of the three convolution stages of :data:`ARCHITECTURE`."""

INPUT_SIZE = 28
"""Side of the square network input, as in PneumoniaMNIST."""

WEIGHTS_FILENAME = "cxr_pneumonia.safetensors"
METRICS_FILENAME = "cxr_pneumonia.metrics.json"

PNEUMONIA = Code("233604007", "SCT", "Pneumonia")

SOP_CR = "1.2.840.10008.5.1.4.1.1.1"
SOP_DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SOP_DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SOP_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def default_weights_path() -> Path:
    """Path of the weights shipped inside the package (``models/weights/``)."""
    return Path(__file__).resolve().parent / "weights" / WEIGHTS_FILENAME


# --------------------------------------------------------------------------- network


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class CxrNet(nn.Module):
    """VGG-style CNN for a 1x28x28 image; returns one logit (pneumonia) per image.

    Three stages of two 3x3 conv + BatchNorm + ReLU (widths :data:`WIDTHS`), 2x2 max-pooling
    between stages (28 -> 14 -> 7), global average pooling, dropout and one linear layer.
    :meth:`features` (the last conv stage, 7x7) is what Grad-CAM uses.
    """

    def __init__(self, widths: tuple[int, int, int] = WIDTHS, dropout: float = 0.3) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            *_conv_bn_relu(1, w1),
            *_conv_bn_relu(w1, w1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w1, w2),
            *_conv_bn_relu(w2, w2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w2, w3),
            *_conv_bn_relu(w3, w3),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(w3, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, 1, 28, 28) normalised images -> (N,) logits."""
        out: torch.Tensor = self.head(self.features(x))
        return out.squeeze(1)


# --------------------------------------------------------------------------- weights file


@dataclass(frozen=True)
class WeightsMeta:
    """Metadata stored in the safetensors header next to the tensors."""

    architecture: str
    threshold: float
    mean: float
    std: float
    input_size: int
    model_version: str

    def to_strings(self) -> dict[str, str]:
        """The metadata as the ``str -> str`` mapping safetensors stores."""
        return {
            "architecture": self.architecture,
            "threshold": repr(self.threshold),
            "mean": repr(self.mean),
            "std": repr(self.std),
            "input_size": str(self.input_size),
            "model_version": self.model_version,
        }

    @classmethod
    def from_strings(cls, meta: dict[str, str]) -> WeightsMeta:
        """Parse the safetensors metadata; raise :class:`ModelError` when it is incomplete."""
        try:
            out = cls(
                architecture=meta["architecture"],
                threshold=float(meta["threshold"]),
                mean=float(meta["mean"]),
                std=float(meta["std"]),
                input_size=int(meta["input_size"]),
                model_version=meta["model_version"],
            )
        except (KeyError, ValueError) as exc:
            raise WeightsError(f"weights metadata incomplete or invalid: {exc}") from exc
        if not (0.0 <= out.threshold <= 1.0) or not (out.std > 0.0):
            raise WeightsError(f"weights metadata out of range: {meta}")
        return out


def save_weights(
    net: CxrNet, path: Path, meta: WeightsMeta, extra: dict[str, str] | None = None
) -> None:
    """Write ``net``'s state dict and ``meta`` (plus ``extra`` strings) to a safetensors file."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    header = dict(extra or {})
    header.update(meta.to_strings())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    canonicalise_safetensors(path)
    path.chmod(0o644)


def canonicalise_safetensors(path: Path) -> None:
    """Rewrite a safetensors header as sorted, compact JSON, so equal content gives equal bytes.

    safetensors writes its JSON header (tensor entries and ``__metadata__``) in hash-map
    order, which changes from run to run; the tensor data and its offsets do not. Sorting the
    header makes the file, and so its SHA-256 and :attr:`CxrPneumoniaModel.algorithm_version`,
    reproducible. The header is padded with spaces to a multiple of 8 bytes, as the format
    allows.
    """
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])


def read_weights(path: Path, device: str = "cpu") -> tuple[CxrNet, WeightsMeta]:
    """Load a safetensors weights file into a fresh :class:`CxrNet` in eval mode."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        meta = WeightsMeta.from_strings(dict(fh.metadata() or {}))
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensors[key] = fh.get_tensor(key)
    if meta.architecture != ARCHITECTURE or meta.input_size != INPUT_SIZE:
        raise WeightsError(
            f"weights are for {meta.architecture!r} at {meta.input_size}px; "
            f"this code runs {ARCHITECTURE!r} at {INPUT_SIZE}px"
        )
    net = CxrNet()
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights do not fit {ARCHITECTURE}: {exc}") from exc
    net.eval()
    net.requires_grad_(False)
    return net.to(torch.device(device)), meta


# --------------------------------------------------------------------------- preprocessing


def center_square(rows: int, cols: int) -> tuple[int, int, int]:
    """(top, left, side) of the central square whose side is the short edge (MedMNIST crop)."""
    side = min(rows, cols)
    return (rows - side) // 2, (cols - side) // 2, side


def to_model_grid(image: torch.Tensor) -> torch.Tensor:
    """Turn a (rows, cols) display image in [0, 1] into the (1, 1, 28, 28) grid MedMNIST made.

    MedMNIST built PneumoniaMNIST by center-cropping each source image to a square whose side
    is the short edge and resizing it to 28x28. The crop is reproduced exactly; the resize
    uses antialiased bilinear interpolation (a triangle filter widened by the scale factor, as
    Pillow does), so that a 2000-pixel film is averaged rather than point-sampled. An image that
    is already 28x28 passes through unchanged. No normalisation is applied here.
    """
    if image.ndim != 2:
        raise UnsupportedInput(f"expected a 2-D image, got shape {tuple(image.shape)}")
    top, left, side = center_square(int(image.shape[0]), int(image.shape[1]))
    crop = image[top : top + side, left : left + side].to(torch.float32)
    grid = crop.reshape(1, 1, side, side)
    if side != INPUT_SIZE:
        grid = F.interpolate(
            grid,
            size=(INPUT_SIZE, INPUT_SIZE),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
    return grid.clamp(0.0, 1.0)


# --------------------------------------------------------------------------- the plug-in


class CxrPneumoniaModel(Model):
    """Pneumonia probability for one frontal chest radiograph (research demo, not clinical).

    ``predict`` expects a :class:`Volume` whose array is (1, rows, cols) float32 holding the
    display-ready grey levels scaled to [0, 1], 1 = white (bones bright), as produced by
    :func:`node.infer.radiograph.radiograph_to_volume`.
    """

    name = "cxr-pneumonia"
    version = "1.0.0"
    intended_use = (
        "Research demonstration only; NOT for clinical use. Estimates the probability of "
        "pneumonia on one frontal chest radiograph with a small CNN trained on 28x28 "
        "paediatric chest X-rays (PneumoniaMNIST, derived from Kermany et al. 2018). "
        "Not validated on adults, other views or other populations."
    )
    input_spec = InputSpec(
        modalities=("CR", "DX"),
        sop_class_uids=(SOP_CR, SOP_DX_PRESENTATION, SOP_DX_PROCESSING, SOP_SECONDARY_CAPTURE),
        min_slices=1,
        max_slices=1,
        body_parts=("CHEST",),
        description="One single-frame frontal chest radiograph (CR, DX or secondary capture).",
    )

    def __init__(self, weights_path: str | Path | None = None) -> None:
        """``weights_path``: a safetensors file; default: the weights shipped in the package."""
        self._weights_path = (
            Path(weights_path) if weights_path is not None else default_weights_path()
        )
        self._net: CxrNet | None = None
        self._meta: WeightsMeta | None = None
        self._device = torch.device("cpu")
        self._sha256: str | None = None

    @property
    def weights_path(self) -> Path:
        """The weights file this instance uses."""
        return self._weights_path

    @property
    def weights_sha256(self) -> str:
        """Hex SHA-256 of the weights file (computed once, again by :meth:`load`)."""
        if self._sha256 is None:
            if not self._weights_path.is_file():
                raise WeightsError(f"weights file not found: {self._weights_path}")
            self._sha256 = sha256_file(self._weights_path)
        return self._sha256

    @property
    def threshold(self) -> float:
        """Operating threshold on the probability, from the weights metadata."""
        return self._loaded()[1].threshold

    def load(self, device: str) -> None:
        """Load the weights onto ``device`` (once; later calls with the same device are no-ops)."""
        target = torch.device(device)
        if self._net is not None and self._device == target:
            return
        net, meta = read_weights(self._weights_path, device=device)
        self._net, self._meta, self._device = net, meta, target
        self._sha256 = sha256_file(self._weights_path)

    def _loaded(self) -> tuple[CxrNet, WeightsMeta]:
        if self._net is None or self._meta is None:
            raise ModelError(f"{self.name}: load() has not been called")
        return self._net, self._meta

    def _input(self, volume: Volume) -> torch.Tensor:
        """Validate ``volume`` and return the normalised (1, 1, 28, 28) network input."""
        self.check_input(volume)
        arr = np.asarray(volume.array)
        if arr.ndim != 3 or arr.shape[0] != 1 or min(arr.shape[1:]) < 1:
            raise UnsupportedInput(f"expected a (1, rows, cols) image, got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ModelError("image contains NaN or infinite values")
        _, meta = self._loaded()
        image = torch.from_numpy(np.ascontiguousarray(arr[0], dtype=np.float32))
        grid = to_model_grid(image)
        return ((grid - meta.mean) / meta.std).to(self._device)

    def logit(self, volume: Volume) -> float:
        """Raw network output (log-odds of pneumonia) for one radiograph."""
        net, _ = self._loaded()
        x = self._input(volume)
        cuda = self._device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = net(x).float()
        return float(out[0].item())

    def probability(self, volume: Volume) -> float:
        """Pneumonia probability in [0, 1] for one radiograph."""
        logit = self.logit(volume)
        if logit >= 0.0:  # numerically stable logistic function
            return 1.0 / (1.0 + math.exp(-logit))
        odds = math.exp(logit)
        return odds / (1.0 + odds)

    def predict(self, volume: Volume) -> Prediction:
        """One :class:`Finding` "Pneumonia" with its probability and the shipped threshold."""
        _, meta = self._loaded()
        p = self.probability(volume)
        if not math.isfinite(p):
            raise ModelError("network output is not finite")
        finding = Finding(name=PNEUMONIA, probability=p, threshold=meta.threshold)
        explanation = Heatmap(finding=PNEUMONIA, array=self.heatmap(volume)[None],
                              label="Pneumonia class activation (Grad-CAM)")
        return Prediction(findings=[finding], heatmaps=[explanation])

    def heatmap(self, volume: Volume) -> npt.NDArray[np.float32]:
        """Grad-CAM map of the pneumonia logit, (rows, cols) float32 in [0, 1].

        The map is computed on the last conv stage (7x7 over the central square crop),
        upsampled bilinearly to the crop and placed back into the image; pixels outside the
        crop (which the network never sees) are 0. It is scaled so that its maximum is 1; an
        all-zero map means no region raised the logit.
        """
        net, _ = self._loaded()
        x = self._input(volume)
        rows, cols = int(volume.array.shape[1]), int(volume.array.shape[2])
        with torch.enable_grad():
            feats = net.features(x).detach().requires_grad_(True)
            logit = net.head(feats).sum()
            (grads,) = torch.autograd.grad(logit, feats)
        with torch.no_grad():
            weights = grads.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * feats).sum(dim=1, keepdim=True))
            top, left, side = center_square(rows, cols)
            cam = F.interpolate(cam, size=(side, side), mode="bilinear", align_corners=False)
            cam = cam.clamp_min(0.0)
            peak = float(cam.max().item())
            if peak > 0.0:
                cam = cam / peak
        out = np.zeros((rows, cols), dtype=np.float32)
        out[top : top + side, left : left + side] = cam[0, 0].cpu().numpy()
        return np.clip(out, 0.0, 1.0)
