"""The README's configuration reference covers every settings key."""

from __future__ import annotations

from pydantic import BaseModel

from node.settings import Destination, Route, Settings
from tests.peers import ROOT


def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += keys(kind, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_readme_documents_every_settings_key() -> None:
    readme = (ROOT / "README.md").read_text()
    expected = [k for k in keys(Settings) if k not in ("destinations", "routes")]
    expected += [f"destinations[].{k}" for k in keys(Destination)]
    expected += [f"routes[].{k}" for k in keys(Route)]
    missing = [k for k in expected if f"`{k}`" not in readme]
    assert missing == []
