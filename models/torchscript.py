"""Bring-your-own models: a TorchScript file or a MONAI bundle, declared without Python.

The spec says how to feed the network (2D images or 3D volumes, resize, window or
normalisation), how to read its output (class scores or a segmentation label
map), and the codes of each class or label. The SHA-256 of the weights file is
part of the algorithm version written into every result.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from models.base import (
    Code,
    Finding,
    InputSpec,
    Model,
    ModelError,
    Prediction,
    Segment,
    Volume,
    WeightsError,
    sha256_file,
)

log = logging.getLogger("ainode.models.torchscript")
Task = Literal["classification", "segmentation"]
Activation = Literal["softmax", "sigmoid", "none"]


@dataclass(frozen=True)
class ClassOutput:
    """Output channel ``index`` of a classifier is the probability of finding ``code``."""

    index: int
    code: Code
    threshold: float = 0.5


@dataclass(frozen=True)
class LabelOutput:
    """Label ``value`` of a segmentation label map is the segment ``label``."""

    value: int
    label: str
    category: Code
    type: Code
    type_modifier: Code | None = None


@dataclass(frozen=True)
class TorchScriptSpec:
    name: str
    version: str
    path: Path
    task: Task
    modalities: tuple[str, ...]
    dims: Literal[2, 3] = 2
    input_size: tuple[int, ...] | None = None
    """(rows, columns) for 2D, (slices, rows, columns) for 3D; None keeps the input size."""
    window: tuple[float, float] | None = None
    """(center, width): clip to the window and scale to [0, 1]."""
    normalize: tuple[float, float] | None = None
    """(mean, std) applied after the window."""
    activation: Activation = "softmax"
    classes: tuple[ClassOutput, ...] = ()
    labels: tuple[LabelOutput, ...] = ()
    min_slices: int = 1
    batch_size: int = 8
    intended_use: str = "Site-supplied model."

    def __post_init__(self) -> None:
        if self.task == "classification" and not self.classes:
            raise ValueError(f"model {self.name}: a classifier needs classes with codes")
        if self.task == "segmentation" and not self.labels:
            raise ValueError(f"model {self.name}: a segmentation model needs labels with codes")
        if self.input_size is not None and len(self.input_size) != self.dims:
            raise ValueError(f"model {self.name}: input_size must have {self.dims} values")
        if self.batch_size < 1:
            raise ValueError(f"model {self.name}: batch_size must be at least 1")


def spec_from_monai_bundle(folder: Path, **overrides: object) -> TorchScriptSpec:
    """A spec from a MONAI bundle folder (``configs/metadata.json``, ``models/model.ts``).

    Name, version and the input's spatial shape come from the metadata unless
    ``overrides`` give them; the codes of the outputs always come from ``overrides``.
    """
    meta_path = folder / "configs" / "metadata.json"
    weights = folder / "models" / "model.ts"
    if not meta_path.is_file() or not weights.is_file():
        raise WeightsError(f"{folder}: not a MONAI bundle (needs configs/metadata.json and "
                         "models/model.ts)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    image = meta.get("network_data_format", {}).get("inputs", {}).get("image", {})
    shape = [int(v) for v in image.get("spatial_shape", []) if isinstance(v, int)]
    values: dict[str, object] = {
        "name": str(meta.get("name", folder.name)).lower().replace(" ", "-"),
        "version": str(meta.get("version", "0")),
        "path": weights,
    }
    if shape and "input_size" not in overrides:
        values["input_size"] = tuple(shape)
        values["dims"] = len(shape)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TorchScriptSpec(**values)  # type: ignore[arg-type]


@dataclass
class TorchScriptModel(Model):
    """A model run from a TorchScript file according to its :class:`TorchScriptSpec`."""

    spec: TorchScriptSpec
    _net: torch.jit.ScriptModule | None = field(default=None, init=False)
    _device: torch.device = field(default=torch.device("cpu"), init=False)
    _sha256: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if not self.spec.path.is_file():
            raise WeightsError(f"model {self.spec.name}: weights file {self.spec.path} not found")
        self.name = self.spec.name
        self.version = self.spec.version
        self.intended_use = self.spec.intended_use
        self.input_spec = InputSpec(modalities=self.spec.modalities,
                                    min_slices=self.spec.min_slices,
                                    description=f"{self.spec.dims}D {self.spec.task} model")
        self._sha256 = sha256_file(self.spec.path)

    @property
    def weights_sha256(self) -> str:
        """Hex SHA-256 of the TorchScript file, computed when the model is made."""
        return self._sha256

    def load(self, device: str) -> None:
        self._device = torch.device(device)
        try:
            net = torch.jit.load(  # type: ignore[no-untyped-call]
                str(self.spec.path), map_location=self._device)
        except RuntimeError as exc:
            raise WeightsError(f"model {self.name}: cannot load TorchScript {self.spec.path}: "
                             f"{exc}") from exc
        net.eval()
        self._net = net
        log.info("model %s weights sha256 %s", self.name, self._sha256)

    def to_device(self, device: str) -> None:
        """Move to another device (used for the CPU fallback after CUDA runs out of memory)."""
        self.load(device)

    # --- pre- and post-processing -----------------------------------------------------

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.window is not None:
            center, width = self.spec.window
            low = center - width / 2
            x = ((x - low) / width).clamp(0.0, 1.0)
        if self.spec.normalize is not None:
            mean, std = self.spec.normalize
            x = (x - mean) / std
        return x

    def _resize(self, x: torch.Tensor, size: tuple[int, ...] | None, *, labels: bool = False
                ) -> torch.Tensor:
        if size is None or tuple(x.shape[2:]) == tuple(size):
            return x
        if labels:
            return F.interpolate(x, size=size, mode="nearest")
        mode = "bilinear" if x.dim() == 4 else "trilinear"
        return F.interpolate(x, size=size, mode=mode, align_corners=False)

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.spec.activation == "softmax":
            return logits.softmax(dim=1)
        if self.spec.activation == "sigmoid":
            return logits.sigmoid()
        return logits

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        assert self._net is not None
        if self._device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self._net(batch)
        else:
            out = self._net(batch)
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"model {self.name}: expected a tensor output, got {type(out)}")
        return out.float()

    def _batches(self, volume: Volume) -> list[torch.Tensor]:
        """The network's outputs: one (N, C, ...) tensor per batch."""
        x = torch.as_tensor(np.ascontiguousarray(volume.array), dtype=torch.float32,
                            device=self._device)
        x = self._intensity(x)
        if self.spec.dims == 3:
            inp = self._resize(x[None, None], self.spec.input_size)
            return [self._forward(inp)]
        outputs = []
        for start in range(0, x.shape[0], self.spec.batch_size):
            chunk = x[start:start + self.spec.batch_size, None]
            outputs.append(self._forward(self._resize(chunk, self.spec.input_size)))
        return outputs

    # --- predict ----------------------------------------------------------------------

    def predict(self, volume: Volume) -> Prediction:
        if self._net is None:
            raise ModelError(f"model {self.name}: predict before load")
        self.check_input(volume)
        with torch.inference_mode():
            outputs = self._batches(volume)
            if self.spec.task == "classification":
                return self._classify(outputs)
            return self._segment(outputs, volume)

    def _classify(self, outputs: list[torch.Tensor]) -> Prediction:
        scores = torch.cat([self._activate(o).reshape(o.shape[0], -1) for o in outputs])
        # Several images (slices): the study-level probability is the highest one.
        probabilities = scores.max(dim=0).values.cpu().numpy()
        findings = []
        for out in self.spec.classes:
            if out.index >= probabilities.shape[0]:
                raise ModelError(f"model {self.name}: no output channel {out.index}")
            findings.append(Finding(name=out.code, probability=float(probabilities[out.index]),
                                    threshold=out.threshold))
        return Prediction(findings=findings)

    def _segment(self, outputs: list[torch.Tensor], volume: Volume) -> Prediction:
        shape = tuple(volume.array.shape)
        maps = []
        for out in outputs:
            label_map = out.argmax(dim=1, keepdim=True).float()
            target = shape if self.spec.dims == 3 else shape[1:]
            maps.append(self._resize(label_map, target, labels=True)[:, 0])
        label_volume: npt.NDArray[np.int64] = (
            torch.cat(maps).reshape(shape).round().long().cpu().numpy())
        segments = [
            Segment(number=i, label=out.label, category=out.category, type=out.type,
                    type_modifier=out.type_modifier, mask=label_volume == out.value,
                    tracking_id=f"{self.name}-{out.value}")
            for i, out in enumerate(self.spec.labels, start=1)
        ]
        return Prediction(segments=segments)

