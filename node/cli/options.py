"""What every ``ainode`` command shares: the ``--config`` option and loading it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from node.errors import ConfigError
from node.settings import CONFIG_ENV, Settings, load_settings

err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar=CONFIG_ENV, help="TOML configuration file.",
                 show_default="embedded default config"),
]


def settings_or_exit(path: Path | None) -> Settings:
    """The validated settings, or exit 2 with the configuration error on stderr."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None
