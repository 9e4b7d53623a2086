"""A study whose planning fails is quarantined with its reason: skipped by later sweeps,
visible, retried or deleted by an admin (queue, completion sweep, API and CLI)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import func, select
from typer.testing import CliRunner

from db import admin
from db.audit import AuditEntry
from db.errors import Conflict, NotFound
from db.queue import (
    InstanceMeta,
    JobPlan,
    ResultSpec,
    SeriesInfo,
    claim_job,
    complete_job,
    dispatch_stable_studies,
    mark_sent,
    record_instance,
)
from db.schema import Instance, Job, Result, ResultKind, Series, Study
from node.admin.app import create_app
from node.cli.main import app as cli
from node.settings import parse_settings
from node.study.completion import complete_studies
from tests.conftest import T0, Factory, dispatch, meta, one_model
from tests.integration.test_admin_api import BASE, MODELS, fake_echo, seed, settings_for

CT = "1.2.840.10008.5.1.4.1.1.2"
QUIET = 60.0
LATER = T0 + timedelta(seconds=120)
HOSTILE = "<img src=x onerror=alert(1)> [/]evil[bold]x"
"""Part of an error text: HTML and rich markup, which must stay text everywhere it is shown."""


class Broken:
    """A planner that raises for the series in :attr:`broken` and records what it planned."""

    def __init__(self, *broken: str) -> None:
        self.broken = set(broken)
        self.calls: list[str] = []

    def __call__(self, series: SeriesInfo) -> list[JobPlan]:
        self.calls.append(series.series_uid)
        if series.series_uid in self.broken:
            raise OSError(f"unreadable instance file {HOSTILE}")
        return one_model(series)


def sweep(factory: Factory, now: datetime, plan: Broken,
          problems: dict[str, str] | None = None) -> list[int]:
    return dispatch_stable_studies(factory, now, lambda _m: QUIET, plan, max_attempts=2,
                                   problems=problems)


def study(factory: Factory, uid: str) -> Study:
    with factory() as s:
        row = s.scalars(select(Study).where(Study.study_uid == uid)).one()
        s.expunge(row)
        return row


def audit(factory: Factory) -> list[tuple[str, str]]:
    with factory() as s:
        return [(e.action, e.target) for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id))]


REASON = f"OSError: unreadable instance file {HOSTILE}"


# --- queue ------------------------------------------------------------------------


def test_failed_planning_quarantines_the_study_until_an_admin_retries_it(
        factory: Factory) -> None:
    record_instance(factory, meta("1.9.1", series="1.2.3.1", study="1.2.3"), T0)
    record_instance(factory, meta("1.9.2", series="1.2.4.1", study="1.2.4"), T0)
    plan = Broken("1.2.4.1")
    problems: dict[str, str] = {}
    assert len(sweep(factory, LATER, plan, problems)) == 1  # the other study goes on
    assert problems == {"1.2.4": REASON}
    bad = study(factory, "1.2.4")
    assert (bad.quarantine_reason, bad.quarantined_at, bad.completed_at) == (REASON, LATER, None)
    assert study(factory, "1.2.3").quarantined_at is None
    with factory() as s:
        assert s.scalars(select(Series.pending).where(Series.study_id == bad.id)).all() == [True]

    # Later sweeps leave it alone: no planning every second, nothing reported again.
    plan.calls.clear()
    problems.clear()
    assert sweep(factory, LATER + timedelta(seconds=1), plan, problems) == []
    assert plan.calls == [] and problems == {}

    # A late instance does not lift the quarantine: the study stays visible as it is.
    record_instance(factory, meta("1.9.3", series="1.2.4.2", study="1.2.4"), LATER)
    assert sweep(factory, LATER + timedelta(minutes=5), plan, problems) == []
    assert plan.calls == [] and problems == {}
    assert study(factory, "1.2.4").quarantine_reason == REASON
    listed = admin.list_studies(factory, quarantined=True)
    assert [(r.study_uid, r.quarantine_reason, r.quarantined_at) for r in listed.items] == [
        ("1.2.4", REASON, LATER)]
    assert admin.list_studies(factory).total == 2
    assert admin.summary(factory, LATER).studies_quarantined == 1

    # Retried while still broken: quarantined again, reported again.
    admin.retry_study(factory, bad.id, "tester", LATER + timedelta(minutes=6))
    assert study(factory, "1.2.4").quarantined_at is None
    assert sweep(factory, LATER + timedelta(minutes=7), plan, problems) == []
    assert problems == {"1.2.4": REASON}
    assert study(factory, "1.2.4").quarantined_at == LATER + timedelta(minutes=7)

    # Retried once planning works: both series are planned and the study completes.
    plan.broken.clear()
    plan.calls.clear()
    admin.retry_study(factory, bad.id, "tester", LATER + timedelta(minutes=8))
    jobs = sweep(factory, LATER + timedelta(minutes=9), plan)
    assert sorted(plan.calls) == ["1.2.4.1", "1.2.4.2"] and len(jobs) == 2
    done = study(factory, "1.2.4")
    assert done.completed_at == LATER + timedelta(minutes=9)
    assert (done.quarantine_reason, done.quarantined_at) == (None, None)
    assert admin.summary(factory, LATER).studies_quarantined == 0
    assert audit(factory) == [("retry", f"study {bad.id}"), ("retry", f"study {bad.id}")]
    with factory() as s:
        detail = s.scalars(select(AuditEntry.detail)).first()
    assert detail == f"1.2.4 was quarantined: {REASON}"

    with pytest.raises(Conflict):  # not quarantined (any more)
        admin.retry_study(factory, bad.id, "tester", LATER)
    with pytest.raises(NotFound):
        admin.retry_study(factory, 999, "tester", LATER)
    assert len(audit(factory)) == 2


def _instance(factory: Factory, root: Path, sop: str, series: str, study_uid: str,
              at: datetime) -> Path:
    rel = f"instances/{study_uid}/{series}/{sop}.dcm"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(b"DICM")
    record_instance(factory, InstanceMeta(
        study_uid=study_uid, series_uid=series, sop_uid=sop, sop_class_uid=CT,
        transfer_syntax=ExplicitVRLittleEndian, path=rel, size=4, calling_ae="TEST",
        modality="CT"), at)
    return root / rel


def _quarantined_after_a_run(factory: Factory, root: Path) -> tuple[int, list[Path]]:
    """Study 1.2.4: a first run done and sent, then a late series whose planning fails."""
    files = [_instance(factory, root, "1.9.1", "1.2.4.1", "1.2.4", T0)]
    (job_id,) = dispatch(factory, LATER)
    job = claim_job(factory, "w:1", LATER, 60)
    assert job is not None and job.id == job_id
    result = root / "results" / "1.2.4" / "sr.dcm"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"DICM-SR")
    files.append(result)
    sr = ResultSpec(ResultKind.SR, "1.2.840.10008.5.1.4.1.1.88.22", "9.9.1", "results/1.2.4/sr.dcm")
    complete_job(factory, job_id, "w:1", LATER, [sr], 1.0)
    with factory() as s:
        result_id = s.scalars(select(Result.id)).one()
    mark_sent(factory, result_id, LATER)
    files.append(_instance(factory, root, "1.9.2", "1.2.4.2", "1.2.4", LATER))
    sweep(factory, LATER + timedelta(minutes=5), Broken("1.2.4.2"))
    bad = study(factory, "1.2.4")
    assert bad.quarantined_at is not None
    return bad.id, files


def test_deleting_a_quarantined_study_removes_its_files_and_rows(factory: Factory,
                                                                 tmp_path: Path) -> None:
    root = tmp_path / "var"
    study_id, files = _quarantined_after_a_run(factory, root)
    other = _instance(factory, root, "1.9.9", "1.2.3.1", "1.2.3", LATER)
    other_id = study(factory, "1.2.3").id
    with pytest.raises(Conflict):  # only a quarantined study
        admin.delete_study(factory, root, other_id, "tester", LATER)

    done = admin.delete_study(factory, root, study_id, "tester", LATER)
    assert (done.study_uid, done.series, done.instances, done.jobs, done.results, done.files) == (
        "1.2.4", 2, 2, 1, 1, 3)
    assert [f for f in files if f.exists()] == []
    assert not (root / "instances" / "1.2.4").exists()
    assert not (root / "results" / "1.2.4").exists()
    assert other.exists() and (root / "instances").is_dir() and (root / "results").is_dir()
    with factory() as s:
        assert s.scalars(select(Study.study_uid)).all() == ["1.2.3"]
        assert s.scalar(select(func.count()).select_from(Series)) == 1
        assert s.scalar(select(func.count()).select_from(Instance)) == 1
        assert s.scalar(select(func.count()).select_from(Job)) == 0
        assert s.scalar(select(func.count()).select_from(Result)) == 0
        entry = s.scalars(select(AuditEntry)).one()
    assert (entry.action, entry.target, entry.actor) == ("delete", f"study {study_id}", "tester")
    assert entry.detail.startswith("1.2.4 (2 series, 2 instances, 1 jobs, 1 results)")
    with pytest.raises(NotFound):
        admin.delete_study(factory, root, study_id, "tester", LATER)


def test_a_study_with_a_running_job_is_not_deleted(factory: Factory, tmp_path: Path) -> None:
    root = tmp_path / "var"
    first = _instance(factory, root, "1.9.1", "1.2.4.1", "1.2.4", T0)
    dispatch(factory, LATER)
    assert claim_job(factory, "w:1", LATER, 60) is not None  # running
    _instance(factory, root, "1.9.2", "1.2.4.2", "1.2.4", LATER)
    sweep(factory, LATER + timedelta(minutes=5), Broken("1.2.4.2"))
    bad = study(factory, "1.2.4")
    with pytest.raises(Conflict, match="running"):
        admin.delete_study(factory, root, bad.id, "tester", LATER)
    assert first.exists() and study(factory, "1.2.4").quarantined_at is not None
    assert audit(factory) == []


# --- the completion sweep -------------------------------------------------------------


def _write_ct(path: Path, sop: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CT)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop
    ds.Modality = "CT"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_the_sweep_logs_a_quarantine_once_and_plans_again_after_a_retry(
        factory: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "var"
    settings = parse_settings(f"""
[storage]
dir = "{root}"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
[[routes]]
name = "ct"
match = {{ Modality = ["CT"] }}
models = ["ct-lung"]
destinations = ["pacs"]
""")
    record_instance(factory, meta("1.9.1", series="1.2.4.1", study="1.2.4"), T0)  # no file
    now = [LATER]
    with caplog.at_level(logging.ERROR, logger="ainode.scheduler"):
        for _ in range(3):
            assert complete_studies(settings, factory, lambda: now[0], {}) == []
            now[0] += timedelta(seconds=1)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "1.2.4" in errors[0] and "quarantined" in errors[0]
    assert "FileNotFoundError" in (study(factory, "1.2.4").quarantine_reason or "")

    _write_ct(root / "instances" / "1.9.1.dcm", "1.9.1")  # the file is back
    admin.retry_study(factory, study(factory, "1.2.4").id, "tester", now[0])
    assert len(complete_studies(settings, factory, lambda: now[0], {})) == 1
    assert study(factory, "1.2.4").completed_at == now[0]


# --- API and CLI ------------------------------------------------------------------------


@pytest.fixture
def quarantined(factory: Factory, tmp_path: Path) -> int:
    """The admin tests' queue (tests/integration/test_admin_api.py) and one quarantined study
    (1.2.7, with its instance file): its id."""
    root = tmp_path / "var"
    seed(factory, root)
    _instance(factory, root, "1.9.7", "1.2.7.1", "1.2.7", T0 + timedelta(minutes=3))
    problems: dict[str, str] = {}
    sweep(factory, T0 + timedelta(minutes=5), Broken("1.2.7.1"), problems)
    assert problems == {"1.2.7": REASON}
    return study(factory, "1.2.7").id


@pytest.fixture
def client(factory: Factory, tmp_path: Path, quarantined: int) -> Iterator[TestClient]:
    app = create_app(settings_for(tmp_path), factory, models=lambda: MODELS,
                     clock=lambda: T0 + timedelta(minutes=10), echo=fake_echo)
    with TestClient(app, base_url=BASE) as c:
        c.headers["X-CSRF-Token"] = c.get("/api/session").json()["csrf_token"]
        yield c


def test_api_lists_retries_and_deletes_a_quarantined_study(
        client: TestClient, factory: Factory, tmp_path: Path, quarantined: int) -> None:
    listed = client.get("/api/studies").json()
    assert listed["total"] == 3
    row = next(s for s in listed["items"] if s["id"] == quarantined)
    assert row["quarantine_reason"] == REASON and row["quarantined_at"].startswith("2026")
    assert all(s["quarantine_reason"] is None for s in listed["items"] if s is not row)
    only = client.get("/api/studies", params={"quarantined": "true"}).json()
    assert [s["study_uid"] for s in only["items"]] == ["1.2.7"]
    assert client.get("/api/summary").json()["summary"]["studies_quarantined"] == 1

    url = f"/api/studies/{quarantined}"
    for path in (url + "/retry", url + "/delete"):  # CSRF-checked, POST only
        assert client.post(path, headers={"X-CSRF-Token": "forged"}).status_code == 403
        assert client.post(path, headers={"Origin": "http://evil.example"}).status_code == 403
        assert client.get(path).status_code == 405
    assert study(factory, "1.2.7").quarantined_at is not None and audit(factory) == []

    r = client.post(url + "/retry")
    assert r.status_code == 200 and r.json()["ok"], r.text
    assert study(factory, "1.2.7").quarantined_at is None
    assert client.post(url + "/retry").status_code == 409
    assert client.post(url + "/delete").status_code == 409  # not quarantined now
    assert client.post("/api/studies/999/retry").status_code == 404

    sweep(factory, T0 + timedelta(minutes=10), Broken("1.2.7.1"))  # still broken
    r = client.post(url + "/delete")
    assert r.status_code == 200, r.text
    assert "1 instance(s)" in r.json()["message"]
    assert not (tmp_path / "var" / "instances" / "1.2.7").exists()
    assert client.post(url + "/delete").status_code == 404
    assert client.get("/api/studies").json()["total"] == 2
    target = f"study {quarantined}"
    assert audit(factory) == [("retry", target), ("delete", target)]
    assert [a["action"] for a in client.get("/api/audit").json()] == ["delete", "retry"]


runner = CliRunner()


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    path = tmp_path / "ainode.toml"
    path.write_text(f"""
[storage]
dir = "{tmp_path / 'var'}"
[database]
url = "{db_url}"
""")
    return path


def test_cli_lists_retries_and_deletes_a_quarantined_study(
        config: Path, factory: Factory, tmp_path: Path, quarantined: int) -> None:
    def ainode(*args: str, answer: str | None = None) -> tuple[int, str]:
        result = runner.invoke(cli, [*args, "-c", str(config)], input=answer)
        return result.exit_code, result.output

    code, output = ainode("studies", "list")
    assert code == 0, output
    words = " ".join(output.split())
    assert f"quarantined study {quarantined} (1.2.7) since" in words
    assert REASON in words  # markup shown literally
    code, output = ainode("studies", "list", "--quarantined", "--json")
    body = json.loads(output)
    assert [(s["id"], s["quarantine_reason"]) for s in body["items"]] == [(quarantined, REASON)]
    code, output = ainode("status")
    assert code == 0 and "quarantined studies: 1" in output

    assert ainode("studies", "retry", str(quarantined))[0] == 0
    code, output = ainode("studies", "retry", str(quarantined))
    assert code == 1 and "retry refused" in output
    sweep(factory, T0 + timedelta(minutes=10), Broken("1.2.7.1"))  # still broken

    code, output = ainode("studies", "delete", str(quarantined), answer="n\n")
    assert code == 1 and study(factory, "1.2.7").quarantined_at is not None
    code, output = ainode("studies", "delete", str(quarantined), "--yes")
    assert code == 0 and f"study {quarantined} deleted: 1.2.7" in output, output
    assert not (tmp_path / "var" / "instances" / "1.2.7").exists()
    code, output = ainode("studies", "delete", str(quarantined), "--yes")
    assert code == 1 and "delete refused" in output
    with factory() as s:
        entries = list(s.scalars(select(AuditEntry).order_by(AuditEntry.id)))
    assert [e.action for e in entries] == ["retry", "delete"]
    assert all(e.actor.startswith("cli:") for e in entries)
