"""Models available to this node: discovered plug-ins plus the models declared in the config."""

from __future__ import annotations

from functools import partial

from models.base import Code, Model
from models.registry import ModelFactory, discover
from models.torchscript import (
    ClassOutput,
    LabelOutput,
    TorchScriptModel,
    TorchScriptSpec,
    spec_from_monai_bundle,
)
from node.errors import ConfigError
from node.settings import CodeConfig, ModelConfig, Settings


def _code(c: CodeConfig) -> Code:
    return Code(c.value, c.scheme, c.meaning)


def spec_for(config: ModelConfig) -> TorchScriptSpec:
    """The model spec of a configured model (a MONAI bundle reads its own metadata)."""
    values: dict[str, object] = {
        "name": config.name, "task": config.task, "modalities": tuple(config.modalities),
        "window": config.window, "normalize": config.normalize,
        "activation": config.activation, "min_slices": config.min_slices,
        "batch_size": config.batch_size, "intended_use": config.intended_use,
        "classes": tuple(ClassOutput(c.index, _code(c.code), c.threshold)
                         for c in config.classes),
        "labels": tuple(LabelOutput(lab.value, lab.label, _code(lab.category), _code(lab.type),
                                    _code(lab.type_modifier) if lab.type_modifier else None)
                        for lab in config.labels),
    }
    if config.input_size is not None:
        values["input_size"] = tuple(config.input_size)
        values["dims"] = config.dims
    if config.kind == "monai-bundle":
        values["version"] = config.version
        return spec_from_monai_bundle(config.path, **values)
    values.setdefault("dims", config.dims)
    return TorchScriptSpec(path=config.path, version=str(config.version),
                           **values)  # type: ignore[arg-type]


def _configured(config: ModelConfig) -> Model:
    return TorchScriptModel(spec_for(config))


def available_models(settings: Settings) -> dict[str, ModelFactory]:
    """Installed plug-ins and the config's own models; a name may be used only once."""
    found = discover()
    for config in settings.models:
        if config.name in found:
            raise ConfigError(f"models: {config.name!r} is already the name of an installed model")
        found[config.name] = partial(_configured, config)
    return found
