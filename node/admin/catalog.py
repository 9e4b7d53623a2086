"""The installed models as the admin server shows them (version, weights hash, input)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from models.base import WeightsError
from models.registry import ModelFactory

log = logging.getLogger("ainode.admin")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    algorithm_version: str
    weights_sha256: str | None
    modalities: list[str]
    intended_use: str


def describe(name: str, factory: ModelFactory) -> ModelInfo:
    """Instantiate (not load) a model and read what it declares about itself."""
    model = factory()
    weights: str | None
    try:
        weights, algorithm = model.weights_sha256, model.algorithm_version
    except (OSError, WeightsError) as exc:  # weights file missing or unreadable
        log.warning("model %s: cannot read its weights: %s", name, exc)
        weights, algorithm = None, model.version
    return ModelInfo(name=name, version=model.version, algorithm_version=algorithm,
                     weights_sha256=weights, modalities=list(model.input_spec.modalities),
                     intended_use=model.intended_use)


def catalog(registry: Callable[[], dict[str, ModelFactory]]) -> Callable[[], list[ModelInfo]]:
    """A provider that describes every model once, on first use (models may import torch)."""

    @cache
    def models() -> list[ModelInfo]:
        return [describe(name, factory) for name, factory in sorted(registry().items())]

    return models
