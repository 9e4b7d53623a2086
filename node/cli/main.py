"""The ``ainode`` command line."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.table import Table

from node.cli import ops
from node.cli.options import ConfigOption, err, literal, out, settings_or_exit
from node.errors import ConfigError

app = typer.Typer(help="ainode: an AI node for a hospital PACS.", no_args_is_help=True,
                  add_completion=False)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
models_app = typer.Typer(help="Installed models.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.command()(ops.status)
app.command("hash-secret")(ops.hash_secret)
app.add_typer(ops.jobs_app, name="jobs")
app.add_typer(ops.studies_app, name="studies")
app.add_typer(ops.destinations_app, name="destinations")


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Receive, queue, infer and send: the whole node."""
    from node.runtime.logs import configure
    from node.runtime.serve import serve as run

    settings = settings_or_exit(config)
    configure(settings.logging.level)
    try:
        code = run(settings, config)
    except ConfigError as exc:  # a start-up check failed: nothing was started
        err.print(f"[red]configuration error:[/red] "
                  f"{literal(config or 'embedded default config')}: {literal(exc)}",
                  soft_wrap=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@app.command(hidden=True)
def acceptor(index: Annotated[int, typer.Option(help="Which acceptor this is.")],
             channel: Annotated[int, typer.Option(help="Unix channel fd from serve.")],
             config: ConfigOption = None) -> None:
    """One of dicom.acceptors processes receiving associations (started by serve)."""
    import socket

    from node.receive.acceptors import run_acceptor
    from node.runtime.logs import configure

    settings = settings_or_exit(config)
    configure(settings.logging.level)
    raise typer.Exit(run_acceptor(settings, index, socket.socket(fileno=channel)))


@app.command()
def worker(config: ConfigOption = None,
           device: Annotated[str | None, typer.Option(help="Override workers.device.")] = None
           ) -> None:
    """Run one inference worker (serve starts workers.count of these)."""
    # Idle OpenMP threads sleep instead of spinning: the worker shares the machine with
    # the receiver, and spinning threads slow both down badly (ct-lung: 1.6 s vs 4-7 s).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from db.engine import make_engine, make_session_factory
    from db.queue import requeue_expired
    from node.infer.plugins import available_models
    from node.infer.worker import Worker, resolve_device
    from node.runtime.clock import utcnow
    from node.runtime.logs import configure

    settings = settings_or_exit(config)
    configure(settings.logging.level)
    factory = make_session_factory(make_engine(settings.database.url))
    requeue_expired(factory, utcnow())
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Worker(settings=settings, factory=factory, registry=available_models(settings), clock=utcnow,
           device=resolve_device(device or settings.workers.device)).run(stop)


@app.command("check-config")
def check_config(path: Annotated[Path, typer.Argument(help="TOML configuration file.")]) -> None:
    """Validate a configuration file without serving: every check serve makes at start."""
    from node.runtime.startup import startup_problems

    settings = settings_or_exit(path)
    problems = startup_problems(settings)
    for problem in problems:
        err.print(f"[red]configuration error:[/red] {literal(path)}: {literal(problem)}",
                  soft_wrap=True)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"{path}: OK ({len(settings.routes)} route(s), "
               f"{len(settings.destinations)} destination(s))")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Apply the database migrations."""
    from db.migrate import upgrade

    settings = settings_or_exit(config)
    upgrade(settings.database.url)
    typer.echo("database is at the latest revision")


@app.command()
def echo(destination: Annotated[str, typer.Argument(help="Destination name from the config.")],
         config: ConfigOption = None) -> None:
    """C-ECHO a configured destination."""
    from node.receive.reactor import quiet_pynetdicom
    from node.send.sender import echo as c_echo

    settings = settings_or_exit(config)
    try:
        dest = settings.destination(destination)
    except KeyError:
        err.print(f"[red]unknown destination[/red] {literal(repr(destination))}; configured: "
                  f"{literal(', '.join(d.name for d in settings.destinations) or 'none')}")
        raise typer.Exit(2) from None
    quiet_pynetdicom()
    result = c_echo(dest, settings.dicom.ae_title, own_tls=settings.dicom.tls)
    typer.echo(f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): {result.message}")
    raise typer.Exit(0 if result.ok else 1)


@models_app.command("list")
def models_list(config: ConfigOption = None,
                as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the installed models with version and accepted input."""
    from node.infer.plugins import available_models
    from node.infer.worker import resolve_device

    settings = settings_or_exit(config)
    device = resolve_device(settings.workers.device)
    rows: list[dict[str, str]] = []
    for name, factory in sorted(available_models(settings).items()):
        model = factory()
        spec = model.input_spec
        rows.append({"name": name, "version": model.version,
                     "algorithm_version": model.algorithm_version,
                     "accepts": f"{','.join(spec.modalities)} (>= {spec.min_slices} image(s))",
                     "device": device, "intended_use": model.intended_use})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("model", "version", "accepts", "device")
    for row in rows:
        table.add_row(*(literal(row[key]) for key in ("name", "algorithm_version", "accepts",
                                                       "device")))
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
