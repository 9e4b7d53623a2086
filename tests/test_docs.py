"""The README's configuration reference covers every settings key."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel

from node.settings import Settings
from tests.peers import ROOT


def _model_in(annotation: object) -> tuple[type[BaseModel] | None, bool]:
    """The settings model inside an annotation, and whether it is a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0], True
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            found, is_list = _model_in(arg)
            if found is not None:
                return found, is_list
    return None, False


def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        inner, is_list = _model_in(field.annotation)
        if inner is None or (prefix and is_list):
            out.append(f"{prefix}{name}")  # nested lists (e.g. models[].classes) are one key
        elif is_list:
            out += keys(inner, f"{prefix}{name}[].")
        else:
            out += keys(inner, f"{prefix}{name}.")
    return out


def test_readme_documents_every_settings_key() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in keys(Settings) if f"`{k}`" not in readme]
    assert missing == []
