"""The JSON API under ``/api`` (OpenAPI at ``/api/openapi.json``, docs at ``/api/docs``).

Reads need authentication (see :mod:`node.admin.auth`); actions are POST only,
CSRF-checked, and each is written to the audit log with its actor, as is each failed
login. Numbers in URLs are bounded (out of range: 422).
"""

from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, status
from fastapi.responses import FileResponse
from pydantic import BaseModel

from db import admin
from db.schema import JobStatus
from node.admin.auth import LoginFailed, Principal, printable
from node.admin.catalog import ModelInfo
from node.admin.context import AdminContext, context

log = logging.getLogger("ainode.admin")
Ctx = Annotated[AdminContext, Depends(context)]


def principal(request: Request, ctx: Ctx) -> Principal:
    """The authenticated caller; a failed login is logged and audited (then 401)."""
    now = ctx.clock()
    try:
        return ctx.guard.authenticate(request, now)
    except LoginFailed as exc:
        record_failed_login(ctx, exc, now)
        raise


def record_failed_login(ctx: AdminContext, exc: LoginFailed, now: datetime) -> None:
    name = printable(exc.username)
    log.warning("admin: failed login from %s as %s", exc.address, name)
    if exc.locked:
        log.warning("admin: %d failed logins from %s: refused for %g s", ctx.guard.failures.limit,
                    exc.address, ctx.guard.failures.window.total_seconds())
    admin.record_action(ctx.factory, f"{name}@{exc.address}", "login-failed", "admin",
                        "address locked out" if exc.locked else "", now)


def actor(request: Request, ctx: Ctx, who: Annotated[Principal, Depends(principal)]) -> str:
    """An authenticated caller allowed to change state: CSRF-checked, as its audit name."""
    ctx.guard.check_csrf(request, who)
    return who.actor


Who = Annotated[Principal, Depends(principal)]
Actor = Annotated[str, Depends(actor)]
MAX_ID = 2**63 - 1
"""Row ids are 64-bit: a larger one in a path is 422, not an overflow in the database."""
MAX_PAGE = 1_000_000
Id = Annotated[int, Path(ge=1, le=MAX_ID)]
Page = Annotated[int, Query(ge=1, le=MAX_PAGE)]
PerPage = Annotated[int, Query(ge=1, le=admin.MAX_PER_PAGE)]
router = APIRouter(prefix="/api", dependencies=[Depends(principal)])


@dataclass(frozen=True)
class Session:
    actor: str
    csrf_token: str
    auth_required: bool


@dataclass(frozen=True)
class Overview:
    summary: admin.Summary
    destinations: list[admin.DestinationStats]


@dataclass(frozen=True)
class JobPage:
    items: list[admin.JobRow]
    total: int
    page: int
    per_page: int


@dataclass(frozen=True)
class StudyPage:
    items: list[admin.StudyRow]
    total: int
    page: int
    per_page: int


@dataclass(frozen=True)
class ModelRow:
    info: ModelInfo
    devices: list[str]
    stats: admin.ModelStats | None


@dataclass(frozen=True)
class ActionResult:
    ok: bool
    message: str


@dataclass(frozen=True)
class DestinationRow:
    name: str
    ae_title: str
    host: str
    port: int
    stats: admin.DestinationStats


class ResendBody(BaseModel):
    destination: str


@router.get("/session")
def session(ctx: Ctx, who: Who) -> Session:
    """Who the caller is, and the token its POSTs must carry in ``X-CSRF-Token``."""
    return Session(actor=who.actor, csrf_token=ctx.guard.csrf_token(who),
                   auth_required=ctx.guard.credentials.configured)


@router.get("/summary")
def summary(ctx: Ctx) -> Overview:
    """Queue counts, recent traffic, oldest waiting job, workers and destinations."""
    names = [d.name for d in ctx.settings.destinations]
    return Overview(admin.summary(ctx.factory, ctx.clock()),
                    admin.destination_stats(ctx.factory, names))


@router.get("/jobs")
def jobs(ctx: Ctx,
         state: Annotated[JobStatus | None, Query(alias="status")] = None,
         model: str | None = None, modality: str | None = None,
         created_from: Annotated[datetime | None, Query(alias="from")] = None,
         created_to: Annotated[datetime | None, Query(alias="to")] = None,
         q: Annotated[str | None, Query(max_length=64)] = None,
         page: Page = 1, per_page: PerPage = 50) -> JobPage:
    """Jobs, newest first; ``q`` matches study or series UID or accession number."""
    filters = admin.JobFilter(status=state.value if state else None, model=model or None,
                              modality=modality or None, created_from=_naive(created_from),
                              created_to=_naive(created_to), text=q or None)
    found = admin.list_jobs(ctx.factory, filters, page, per_page)
    return JobPage(found.items, found.total, found.page, found.per_page)


@router.get("/jobs/{job_id}")
def job(ctx: Ctx, job_id: Id) -> admin.JobDetail:
    """One job with its timeline and its produced objects per destination."""
    return admin.job_detail(ctx.factory, job_id)


@router.post("/jobs/{job_id}/retry")
def retry(ctx: Ctx, who: Actor, job_id: Id) -> ActionResult:
    admin.retry_job(ctx.factory, job_id, who, ctx.clock())
    log.info("admin %s: retry job %d", who, job_id)
    return ActionResult(True, f"job {job_id} queued again")


@router.post("/jobs/{job_id}/cancel")
def cancel(ctx: Ctx, who: Actor, job_id: Id) -> ActionResult:
    admin.cancel_job(ctx.factory, job_id, who, ctx.clock())
    log.info("admin %s: cancel job %d", who, job_id)
    return ActionResult(True, f"job {job_id} cancelled")


@router.post("/jobs/{job_id}/resend")
def resend(ctx: Ctx, who: Actor, job_id: Id, body: ResendBody) -> ActionResult:
    if body.destination not in {d.name for d in ctx.settings.destinations}:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"unknown destination {body.destination!r}")
    count = admin.resend_job(ctx.factory, job_id, body.destination, who, ctx.clock())
    log.info("admin %s: re-send job %d to %s", who, job_id, body.destination)
    return ActionResult(True, f"{count} object(s) of job {job_id} queued for {body.destination}")


@router.get("/results/{result_id}/file", response_class=FileResponse)
def result_file(ctx: Ctx, result_id: Id) -> FileResponse:
    """Download a produced result object (SEG, SR, heatmap SEG or SC image; see its kind)."""
    row = admin.get_result(ctx.factory, result_id)
    root = ctx.settings.storage.dir.resolve()
    path = (root / row.path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"file of result {result_id} is gone")
    return FileResponse(path, media_type="application/dicom",
                        filename=f"{row.kind.lower()}-{row.sop_instance_uid}.dcm")


@router.get("/studies")
def studies(ctx: Ctx, q: Annotated[str | None, Query(max_length=64)] = None,
            quarantined: bool = False, page: Page = 1, per_page: PerPage = 50) -> StudyPage:
    """Studies, most recently received first, with their series, instance counts and
    quarantine (``quarantine_reason``, ``quarantined_at``); ``quarantined=true``: only those."""
    found = admin.list_studies(ctx.factory, q or None, page, per_page, quarantined=quarantined)
    return StudyPage(found.items, found.total, found.page, found.per_page)


@router.post("/studies/{study_id}/retry")
def retry_study(ctx: Ctx, who: Actor, study_id: Id) -> ActionResult:
    """Lift a study's quarantine: the next completion sweep plans its jobs again."""
    admin.retry_study(ctx.factory, study_id, who, ctx.clock())
    log.info("admin %s: retry study %d", who, study_id)
    return ActionResult(True, f"study {study_id} released from quarantine: planned again "
                              "at the next sweep")


@router.post("/studies/{study_id}/delete")
def delete_study(ctx: Ctx, who: Actor, study_id: Id) -> ActionResult:
    """Delete a quarantined study: its instances, results, jobs and their files."""
    done = admin.delete_study(ctx.factory, ctx.settings.storage.dir, study_id, who, ctx.clock())
    log.info("admin %s: deleted study %d (%s, %d files)", who, study_id, done.study_uid,
             done.files)
    return ActionResult(True, f"study {study_id} deleted ({done.instances} instance(s), "
                              f"{done.results} result(s), {done.files} file(s))")


@router.get("/models")
def models(ctx: Ctx) -> list[ModelRow]:
    """Installed models, the devices their workers use, and inference statistics."""
    stats = admin.model_stats(ctx.factory)
    devices = sorted({w.device for w in admin.workers(ctx.factory, ctx.clock()) if w.alive})
    return [ModelRow(info, devices or [ctx.settings.workers.device], stats.get(info.name))
            for info in ctx.models()]


@router.get("/destinations")
def destinations(ctx: Ctx) -> list[DestinationRow]:
    stats = admin.destination_stats(ctx.factory, [d.name for d in ctx.settings.destinations])
    return [DestinationRow(d.name, d.ae_title, d.host, d.port, st)
            for d, st in zip(ctx.settings.destinations, stats, strict=True)]


@router.post("/destinations/{name}/echo")
def echo(ctx: Ctx, who: Actor, name: str) -> ActionResult:
    """C-ECHO a destination now; the outcome goes to the audit log."""
    try:
        dest = ctx.settings.destination(name)
    except KeyError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown destination {name!r}") from None
    result = ctx.echo(dest, ctx.settings.dicom.ae_title)
    admin.record_echo(ctx.factory, name, result.ok, result.message, who, ctx.clock())
    return ActionResult(result.ok, result.message)


@router.get("/audit")
def audit(ctx: Ctx, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[admin.AuditRow]:
    """The latest admin actions: who, what, when."""
    return admin.audit_log(ctx.factory, limit)


def _naive(value: datetime | None) -> datetime | None:
    """The database keeps naive UTC."""
    if value is None or value.tzinfo is None:
        return value
    from datetime import UTC

    return value.astimezone(UTC).replace(tzinfo=None)


def static_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent / "static"
