"""The model plug-in contract.

A model works on plain arrays and returns plain arrays plus coded metadata.
This package knows nothing of DICOM networking, the database or highdicom:
``node/`` turns a :class:`Prediction` into DICOM objects.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Code:
    """A coded concept: (value, scheme designator, meaning), e.g. ("10200004", "SCT", "Liver")."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class InputSpec:
    """What input a model accepts. Empty tuples mean "any"."""

    modalities: tuple[str, ...]
    sop_class_uids: tuple[str, ...] = ()
    min_slices: int = 1
    max_slices: int | None = None
    body_parts: tuple[str, ...] = ()
    description: str = ""


AXIAL: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
"""Standard axial ImageOrientationPatient: rows toward patient left, columns toward posterior."""


@dataclass(frozen=True)
class Volume:
    """An image volume built from one series.

    ``array`` is (slices, rows, columns), float32. For CT it is in Hounsfield
    units. Slices are ordered along the slice normal (increasing position).
    ``spacing`` is (slice spacing, row spacing, column spacing) in mm.
    ``slice_uids`` are the SOP Instance UIDs of the source slices, in array order.
    ``orientation`` is the row and column direction cosines (ImageOrientationPatient).
    """

    array: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    modality: str
    slice_uids: tuple[str, ...] = ()
    body_part: str = ""
    orientation: tuple[float, ...] = AXIAL


@dataclass(frozen=True)
class Segment:
    """One segment of a segmentation; ``mask`` has the volume's shape (bool)."""

    number: int
    label: str
    category: Code
    type: Code
    mask: npt.NDArray[np.bool_]
    type_modifier: Code | None = None
    tracking_id: str = ""


@dataclass(frozen=True)
class Measurement:
    """A coded measurement in UCUM units, per segment (``segment_number``) or per study (None)."""

    name: Code
    value: float
    unit: Code
    segment_number: int | None = None
    derivation: Code | None = None


@dataclass(frozen=True)
class Finding:
    """A coded finding with a probability and the threshold that makes it present."""

    name: Code
    probability: float
    threshold: float

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class Heatmap:
    """Where the model looked for ``finding``: values in [0, 1] with the volume's shape.

    A class-activation map (e.g. Grad-CAM); an explanation, not a segmentation.
    """

    finding: Code
    array: npt.NDArray[np.float32]
    label: str = "Class activation map"


@dataclass
class Prediction:
    segments: list[Segment] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    heatmaps: list[Heatmap] = field(default_factory=list)


WEIGHTS_HASH_DIGITS = 16
"""Hex digits of the weights' SHA-256 written into the algorithm version (``2.1+sha256:...``)."""


class ModelError(Exception):
    """Root of the errors of ``models/``: an input a model cannot process or a failure while
    loading or predicting."""


class UnsupportedInput(ModelError):
    """The input does not match what the model accepts; the job is skipped with this reason."""


class WeightsError(ModelError):
    """A model's weights (file or bundle) are missing, unreadable or do not fit the model."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (raises :class:`OSError` when it cannot be read)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class Model(ABC):
    """Base class of every model: set the class attributes, implement load and predict."""

    name: str
    version: str
    intended_use: str
    input_spec: InputSpec

    @abstractmethod
    def load(self, device: str) -> None:
        """Load weights onto ``device`` ("cpu", "cuda", "cuda:N"); called once per worker."""

    @abstractmethod
    def predict(self, volume: Volume) -> Prediction:
        """Run the model on one volume."""

    @property
    def weights_sha256(self) -> str | None:
        """Hex SHA-256 of the weights file; None for a model without weights.

        A model with weights raises :class:`WeightsError` when its file is missing.
        """
        return None

    @property
    def algorithm_version(self) -> str:
        """Version string written into every output.

        ``version``, and for a model with weights ``+sha256:`` and the first
        :data:`WEIGHTS_HASH_DIGITS` hex digits of :attr:`weights_sha256`.
        """
        digest = self.weights_sha256
        if digest is None:
            return self.version
        return f"{self.version}+sha256:{digest[:WEIGHTS_HASH_DIGITS]}"

    def check_input(self, volume: Volume) -> None:
        """Raise :class:`UnsupportedInput` when ``volume`` is outside the input spec."""
        spec = self.input_spec
        if spec.modalities and volume.modality not in spec.modalities:
            raise UnsupportedInput(f"modality {volume.modality!r} not in {list(spec.modalities)}")
        slices = int(volume.array.shape[0])
        if slices < spec.min_slices:
            raise UnsupportedInput(f"{slices} slice(s), needs at least {spec.min_slices}")
        if spec.max_slices is not None and slices > spec.max_slices:
            raise UnsupportedInput(f"{slices} slices, accepts at most {spec.max_slices}")
