"""What every ``ainode`` command shares: the ``--config`` option and loading it, the
consoles, and :func:`literal` for every value a rich console shows."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from node.errors import ConfigError
from node.runtime.logs import escape_controls
from node.settings import CONFIG_ENV, Settings, load_settings

#: Standard error. Emoji codes (``:smile:``) in a value stay text on both consoles.
err = Console(stderr=True, emoji=False)
#: Standard output.
out = Console(emoji=False)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar=CONFIG_ENV, help="TOML configuration file.",
                 show_default="embedded default config"),
]


def literal(value: object) -> str:
    """``value`` for rich markup (an f-string printed, a table cell): shown as it is.

    Values come from DICOM headers, the database, exceptions and the command line:
    ``[`` is escaped (``[/]`` would make rich raise ``MarkupError``, ``[bold]`` style
    the rest), control characters other than line breaks and tabs (which rich lays
    out) are shown as escapes: ``\\x1b`` could drive the terminal.
    """
    return escape(escape_controls(str(value), keep="\n\t"))


def settings_or_exit(path: Path | None) -> Settings:
    """The validated settings, or exit 2 with the configuration error on stderr."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {literal(exc)}")
        raise typer.Exit(2) from None
