"""Model discovery: the built-in models and those installed as Python packages.

Third-party packages register a zero-argument factory (usually the class) under
the entry-point group ``ainode.models``; the entry point's name is the model name.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from models.base import Model, ModelError

ENTRY_POINT_GROUP = "ainode.models"
ModelFactory = Callable[[], Model]


def _ct_lung() -> Model:
    from models.ct_lung import CtLungModel

    return CtLungModel()


def _cxr_pneumonia() -> Model:
    from models.cxr_pneumonia import CxrPneumoniaModel

    return CxrPneumoniaModel()


def builtin_models() -> dict[str, ModelFactory]:
    return {"ct-lung": _ct_lung, "cxr-pneumonia": _cxr_pneumonia}


def discover() -> dict[str, ModelFactory]:
    """All models by name: built-ins first; an installed package cannot shadow a built-in."""
    found = builtin_models()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.load())
    return found


class UnknownModel(ModelError):
    """No model of that name is installed."""

    def __init__(self, name: str) -> None:
        super().__init__(repr(name))  # the quoted name, as the worker's reason has always shown it
        self.name = name


def create(name: str, registry: dict[str, ModelFactory] | None = None) -> Model:
    factories = registry if registry is not None else discover()
    try:
        factory = factories[name]
    except KeyError:
        raise UnknownModel(name) from None
    return factory()
