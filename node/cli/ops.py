"""Operator verbs of ``ainode``: status, jobs, studies, destinations, hash-secret.

They read and act on the node's database directly (the same functions the admin
API uses, so the same rules and the same audit log); ``--json`` prints for scripts.
What they print through rich is markup: every value in it goes through
:func:`~node.cli.options.literal` (DICOM texts, errors and names may hold ``[/]``).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
from collections.abc import Callable
from datetime import datetime
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from db import admin
from db.errors import DbError, NotFound
from db.queue import SessionFactory
from db.schema import JobStatus
from node.cli.options import ConfigOption, err, literal, out, settings_or_exit
from node.runtime.clock import utcnow
from node.settings import Settings

jobs_app = typer.Typer(help="The job queue: list, show, retry, cancel, re-send.",
                       no_args_is_help=True)
studies_app = typer.Typer(help="Received studies: list; retry or delete a quarantined one.",
                          no_args_is_help=True)
destinations_app = typer.Typer(help="Configured DICOM destinations.", no_args_is_help=True)


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _factory(settings: Settings) -> SessionFactory:
    from db.engine import make_engine, make_session_factory

    return make_session_factory(make_engine(settings.database.url))


def _actor() -> str:
    return f"cli:{getpass.getuser()}@{os.uname().nodename}"


def _json(value: object) -> None:
    def plain(v: object) -> object:
        if isinstance(v, datetime):
            return v.isoformat()
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return dataclasses.asdict(v)
        raise TypeError(type(v).__name__)

    typer.echo(json.dumps(value, indent=2, default=plain))


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _act(what: str, action: Callable[[], str]) -> None:
    try:
        message = action()
    except DbError as exc:
        err.print(f"[red]{what}:[/red] {literal(exc)}")
        raise typer.Exit(1) from None
    typer.echo(message)


def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Queue counts, recent traffic, workers and destinations."""
    settings = settings_or_exit(config)
    factory = _factory(settings)
    summary = admin.summary(factory, utcnow())
    dests = admin.destination_stats(factory, [d.name for d in settings.destinations])
    if as_json:
        _json({"summary": dataclasses.asdict(summary),
               "destinations": [dataclasses.asdict(d) for d in dests]})
        return
    counts = Table("state", "jobs", title="Queue")
    for state, n in summary.jobs_by_status.items():
        counts.add_row(literal(state), str(n))
    out.print(counts)
    oldest = summary.oldest_queued_age_seconds
    out.print(f"studies received: {summary.studies_last_hour} last hour, "
              f"{summary.studies_last_day} last day; results sent: "
              f"{summary.results_sent_last_hour} last hour, {summary.results_sent_last_day} "
              "last day")
    out.print("oldest waiting job: " + (f"#{summary.oldest_queued_job_id}, {oldest:.0f} s"
                                         if oldest is not None else "none"))
    if summary.studies_quarantined:
        out.print(f"[red]quarantined studies: {summary.studies_quarantined}[/red] "
                  "(ainode studies list --quarantined)")
    workers = Table("worker", "device", "alive", "job", "last seen", title="Workers")
    for w in summary.workers:
        workers.add_row(literal(w.owner), literal(w.device), "yes" if w.alive else "no",
                        str(w.job_id or ""), _when(w.seen_at))
    out.print(workers)
    _destinations_table(settings, dests)


def _destinations_table(settings: Settings, dests: list[admin.DestinationStats]) -> None:
    table = Table("destination", "AE title", "address", "pending", "sent", "failed",
                  "last C-ECHO", title="Destinations")
    for conf, d in zip(settings.destinations, dests, strict=True):
        echo = (f"{'ok' if d.last_echo_ok else 'failed'} {_when(d.last_echo_at)}"
                if d.last_echo_at else "never")
        table.add_row(literal(d.name), literal(conf.ae_title),
                      literal(f"{conf.host}:{conf.port}"), str(d.pending), str(d.sent),
                      str(d.failed), echo)
    out.print(table)


@jobs_app.command("list")
def jobs_list(config: ConfigOption = None,
              state: Annotated[str | None, typer.Option("--status", help="queued, running, "
                                                        "done, failed, skipped, cancelled")
                               ] = None,
              model: Annotated[str | None, typer.Option()] = None,
              modality: Annotated[str | None, typer.Option()] = None,
              since: Annotated[datetime | None, typer.Option(help="Queued at or after (UTC).")
                               ] = None,
              search: Annotated[str | None, typer.Option("--search", "-q",
                                                         help="Study/series UID or accession.")
                                ] = None,
              page: Annotated[int, typer.Option(min=1)] = 1,
              per_page: Annotated[int, typer.Option(min=1, max=admin.MAX_PER_PAGE)] = 50,
              as_json: JsonOption = False) -> None:
    """Jobs, newest first."""
    settings = settings_or_exit(config)
    if state is not None and state not in {s.value for s in JobStatus}:
        err.print(f"[red]unknown status[/red] {literal(repr(state))}")
        raise typer.Exit(2)
    found = admin.list_jobs(_factory(settings), admin.JobFilter(
        status=state, model=model, modality=modality, created_from=since, text=search),
        page, per_page)
    if as_json:
        _json(found)
        return
    table = Table("job", "state", "model", "modality", "study UID", "queued", "inference",
                  "attempts", title=f"Jobs (page {found.page}, {found.total} in all)")
    for j in found.items:
        table.add_row(str(j.id), literal(j.status), literal(j.model), literal(j.modality),
                      literal(j.study_uid), _when(j.created_at),
                      f"{j.inference_seconds:.2f} s" if j.inference_seconds is not None else "",
                      f"{j.attempts}/{j.max_attempts}")
    out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: int, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """One job: its details, timeline and results."""
    settings = settings_or_exit(config)
    try:
        detail = admin.job_detail(_factory(settings), job_id)
    except NotFound as exc:
        err.print(f"[red]{literal(exc)}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        _json(detail)
        return
    j = detail.job
    out.print(f"[bold]job {j.id}[/bold] {literal(j.status)}: {literal(j.model)} on "
              f"{literal(j.modality)} series {literal(j.series_uid)} "
              f'"{literal(j.series_description)}" (study {literal(j.study_uid)}, accession '
              f"{literal(j.accession_number or '-')}), attempt {j.attempts}/{j.max_attempts}")
    if j.last_error:
        out.print(f"[red]error:[/red] {literal(j.last_error)}")
    timeline = Table("event", "time (UTC)", "detail", title="Timeline")
    for e in detail.timeline:
        timeline.add_row(literal(e.event), _when(e.at), literal(e.detail))
    out.print(timeline)
    results = Table("result", "object", "destination", "state", "attempts", "sent",
                    title="Results")
    for r in detail.results:
        results.add_row(str(r.id), literal(r.kind), literal(r.destination), literal(r.status),
                        str(r.attempts), _when(r.sent_at))
    out.print(results)


@jobs_app.command("retry")
def jobs_retry(job_id: int, config: ConfigOption = None) -> None:
    """Queue a failed, cancelled or skipped job again."""
    factory = _factory(settings_or_exit(config))

    def run() -> str:
        admin.retry_job(factory, job_id, _actor(), utcnow())
        return f"job {job_id} queued again"

    _act("retry refused", run)


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, config: ConfigOption = None) -> None:
    """Cancel a queued or running job."""
    factory = _factory(settings_or_exit(config))

    def run() -> str:
        admin.cancel_job(factory, job_id, _actor(), utcnow())
        return f"job {job_id} cancelled"

    _act("cancel refused", run)


@jobs_app.command("resend")
def jobs_resend(job_id: int, destination: str, config: ConfigOption = None) -> None:
    """Send a done job's results to DESTINATION again."""
    settings = settings_or_exit(config)
    if destination not in {d.name for d in settings.destinations}:
        err.print(f"[red]unknown destination[/red] {literal(repr(destination))}")
        raise typer.Exit(2)
    factory = _factory(settings)

    def run() -> str:
        count = admin.resend_job(factory, job_id, destination, _actor(), utcnow())
        return f"{count} object(s) of job {job_id} queued for {destination}"

    _act("re-send refused", run)


@studies_app.command("list")
def studies_list(config: ConfigOption = None,
                 search: Annotated[str | None, typer.Option("--search", "-q")] = None,
                 quarantined: Annotated[bool, typer.Option(
                     "--quarantined", help="Only quarantined studies (planning failed).")
                                        ] = False,
                 page: Annotated[int, typer.Option(min=1)] = 1,
                 per_page: Annotated[int, typer.Option(min=1, max=admin.MAX_PER_PAGE)] = 50,
                 as_json: JsonOption = False) -> None:
    """Studies, most recent first, with their series, instance counts and quarantine."""
    found = admin.list_studies(_factory(settings_or_exit(config)), search, page, per_page,
                               quarantined=quarantined)
    if as_json:
        _json(found)
        return
    table = Table("id", "study UID", "received", "complete", "jobs", "series (instances)",
                  title=f"Studies (page {found.page}, {found.total} in all)")
    for s in found.items:
        series = ", ".join(f"{se.modality} {se.series_description} ({se.instance_count})".strip()
                           for se in s.series)
        table.add_row(str(s.id), literal(s.study_uid), _when(s.last_received_at),
                      _when(s.completed_at), str(s.jobs), literal(series))
    out.print(table)
    for s in found.items:  # reasons can be long: one paragraph each, under the table
        if s.quarantined_at is not None:
            out.print(f"[red]quarantined[/red] study {s.id} ({literal(s.study_uid)}) since "
                      f"{_when(s.quarantined_at)}: {literal(s.quarantine_reason or '')}")
    if any(s.quarantined_at is not None for s in found.items):
        out.print("retry with `ainode studies retry ID`, or delete with `ainode studies delete ID`")


@studies_app.command("retry")
def studies_retry(study_id: int, config: ConfigOption = None) -> None:
    """Lift a study's quarantine: the next completion sweep plans its jobs again."""
    factory = _factory(settings_or_exit(config))

    def run() -> str:
        admin.retry_study(factory, study_id, _actor(), utcnow())
        return f"study {study_id} released from quarantine: planned again at the next sweep"

    _act("retry refused", run)


@studies_app.command("delete")
def studies_delete(study_id: int, config: ConfigOption = None,
                   yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False
                   ) -> None:
    """Delete a quarantined study: its instances, results, jobs and their files."""
    settings = settings_or_exit(config)
    factory = _factory(settings)
    if not yes and not typer.confirm(f"delete study {study_id} with its files?"):
        err.print("not deleted")
        raise typer.Exit(1)

    def run() -> str:
        done = admin.delete_study(factory, settings.storage.dir, study_id, _actor(), utcnow())
        return (f"study {study_id} deleted: {done.study_uid} ({done.instances} instance(s), "
                f"{done.results} result(s), {done.files} file(s))")

    _act("delete refused", run)


@destinations_app.command("list")
def destinations_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Destinations with their outbox counts and last C-ECHO."""
    settings = settings_or_exit(config)
    dests = admin.destination_stats(_factory(settings), [d.name for d in settings.destinations])
    if as_json:
        _json([{**d.model_dump(), "stats": dataclasses.asdict(st)}
               for d, st in zip(settings.destinations, dests, strict=True)])
        return
    _destinations_table(settings, dests)


@destinations_app.command("echo")
def destinations_echo(names: Annotated[list[str] | None, typer.Argument(
                          help="Destination names; all when none given.")] = None,
                      config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """C-ECHO destinations (with progress); each outcome goes to the audit log."""
    from node.receive.reactor import quiet_pynetdicom
    from node.send.sender import echo

    settings = settings_or_exit(config)
    try:
        dests = [settings.destination(n) for n in names] if names else settings.destinations
    except KeyError as exc:
        err.print(f"[red]unknown destination[/red] {literal(exc)}")
        raise typer.Exit(2) from None
    quiet_pynetdicom()
    factory = _factory(settings)
    outcomes = []
    with Progress(console=err, transient=True, disable=as_json) as progress:
        task = progress.add_task("C-ECHO", total=len(dests))
        for dest in dests:
            progress.update(task, description=f"C-ECHO {literal(dest.name)}")
            result = echo(dest, settings.dicom.ae_title)
            admin.record_echo(factory, dest.name, result.ok, result.message, _actor(), utcnow())
            outcomes.append({"destination": dest.name, "ok": result.ok,
                             "message": result.message})
            progress.advance(task)
    if as_json:
        _json(outcomes)
    else:
        for o in outcomes:
            typer.echo(f"{o['destination']}: {o['message']}")
    raise typer.Exit(0 if all(o["ok"] for o in outcomes) else 1)


def hash_secret(
        secret: Annotated[str | None, typer.Option(
            help="The secret (default: prompt; or generate with --token).")] = None,
        token: Annotated[bool, typer.Option(help="Generate a random API token.")] = False
) -> None:
    """Print the hash of an admin password or token for admin.password_hash/token_hash."""
    from node.admin.secrets import hash_secret as make_hash
    from node.admin.secrets import new_token

    if token:
        secret = new_token()
        err.print(f"token (give it to the client, it is not stored): {literal(secret)}")
    elif secret is None:
        secret = typer.prompt("secret", hide_input=True, confirmation_prompt=True)
    typer.echo(make_hash(secret))
