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


def test_every_file_the_docs_name_exists() -> None:
    """README and docs/architecture.md name files (``node/receive/scp.py``): each is there."""
    import re

    named: set[str] = set()
    for doc in ("README.md", "docs/architecture.md"):
        named |= set(re.findall(r"\b((?:node|db|models|tests|deploy)/[\w/.-]+\.(?:py|md|toml))",
                                (ROOT / doc).read_text()))
    assert len(named) > 20
    assert sorted(p for p in named if not (ROOT / p).is_file()) == []
