"""The admin JSON API, health and metrics on a real SQLite queue (FastAPI's test client)."""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.admin import report_presence
from db.audit import AuditEntry
from db.queue import (
    InstanceMeta,
    JobPlan,
    ResultSpec,
    SeriesInfo,
    claim_job,
    complete_job,
    dispatch_stable_studies,
    fail_job,
    mark_send_failed,
    mark_sent,
    record_instance,
)
from db.schema import Job, JobStatus, Result, ResultStatus
from node.admin.api import static_dir
from node.admin.app import create_app
from node.admin.catalog import ModelInfo, catalog
from node.admin.secrets import hash_secret, verify_secret
from node.errors import ConfigError
from node.send.sender import EchoResult
from node.settings import Destination, Settings, parse_settings
from tests.conftest import Factory

T0 = datetime(2026, 3, 1, 8, 0, 0)
NOW = T0 + timedelta(minutes=10)
ACCESSION = "ACC4711"
BASE = "http://127.0.0.1:8080"
"""Where the tests' client sends requests: a loopback name the admin server allows."""
MODELS = [ModelInfo("ct-lung", "1.0.0", "1.0.0", None, ["CT"], "lungs"),
          ModelInfo("cxr-pneumonia", "1.0.0", "1.0.0+abc", "ab" * 32, ["CR", "DX"], "chest")]


def settings_for(tmp_path: Path, admin: str = "", min_free_mb: int = 1, workers: int = 1
                 ) -> Settings:
    return parse_settings(f"""
[storage]
dir = "{tmp_path / 'var'}"
min_free_mb = {min_free_mb}
[workers]
count = {workers}
[admin]
{admin}
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
[[destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "127.0.0.1"
port = 4243
""")


def fake_echo(dest: Destination, calling: str) -> EchoResult:
    return EchoResult(dest.name == "pacs", f"echo {dest.ae_title} from {calling}")


def seed(factory: Factory, storage: Path) -> dict[str, int]:
    """Three CT series in one study and one CR study: a done, a failed and two queued jobs."""
    for n, (series, modality, study, accession) in enumerate([
            ("1.2.3.1", "CT", "1.2.3", ACCESSION), ("1.2.3.2", "CT", "1.2.3", ACCESSION),
            ("1.2.3.3", "CT", "1.2.3", ACCESSION), ("1.2.9.1", "CR", "1.2.9", "OTHER1")]):
        record_instance(factory, InstanceMeta(
            study_uid=study, series_uid=series, sop_uid=f"{series}.{n}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
            path=f"instances/{n}.dcm", size=1000 + n, calling_ae="MOD", modality=modality,
            series_description=f"series {n}", accession_number=accession), T0)

    def plan(info: SeriesInfo) -> list[JobPlan]:
        model = "cxr-pneumonia" if info.modality == "CR" else "ct-lung"
        return [JobPlan(info.id, model, "route", ("pacs",))]

    ids = dispatch_stable_studies(factory, T0 + timedelta(minutes=2), lambda _m: 60, plan, 3)
    assert len(ids) == 4
    done = claim_job(factory, "w:1", T0 + timedelta(minutes=3), 60)
    assert done is not None
    (storage / "results").mkdir(parents=True, exist_ok=True)
    (storage / "results" / "sr.dcm").write_bytes(b"DICM-SR")
    complete_job(factory, done.id, "w:1", T0 + timedelta(minutes=4),
                 [ResultSpec("SR", "1.2.840.10008.5.1.4.1.1.88.22", "9.9.1", "results/sr.dcm")],
                 2.5)
    with factory() as s:
        result_id = s.scalars(select(Result.id)).one()
    mark_send_failed(factory, result_id, T0 + timedelta(minutes=4), "refused",
                     retry_at=T0 + timedelta(minutes=5), max_attempts=5)
    mark_sent(factory, result_id, T0 + timedelta(minutes=5))
    failed = claim_job(factory, "w:1", T0 + timedelta(minutes=6), 60)
    assert failed is not None
    fail_job(factory, failed.id, "w:1", T0 + timedelta(minutes=7), "ModelError: boom",
             retry=False)
    queued = [i for i in ids if i not in (done.id, failed.id)]
    return {"done": done.id, "failed": failed.id, "queued": queued[0], "queued2": queued[1],
            "result": result_id}


@pytest.fixture
def data(factory: Factory, tmp_path: Path) -> dict[str, int]:
    return seed(factory, tmp_path / "var")


@pytest.fixture
def client(factory: Factory, tmp_path: Path, data: dict[str, int]) -> Iterator[TestClient]:
    app = create_app(settings_for(tmp_path), factory, models=lambda: MODELS, clock=lambda: NOW,
                     echo=fake_echo)
    with TestClient(app, base_url=BASE) as c:
        c.headers["X-CSRF-Token"] = c.get("/api/session").json()["csrf_token"]
        yield c


def audit(factory: Factory) -> list[AuditEntry]:
    with factory() as s:
        return list(s.scalars(select(AuditEntry).order_by(AuditEntry.id)))


def job_status(factory: Factory, job_id: int) -> JobStatus:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.status


def test_summary_counts_recent_traffic_and_oldest_job(client: TestClient,
                                                      data: dict[str, int]) -> None:
    body = client.get("/api/summary").json()
    s = body["summary"]
    assert s["jobs_by_status"] == {"queued": 2, "running": 0, "done": 1, "failed": 1,
                                   "skipped": 0, "cancelled": 0}
    assert (s["studies_last_hour"], s["studies_last_day"]) == (2, 2)
    assert (s["results_sent_last_hour"], s["results_sent_last_day"]) == (1, 1)
    assert s["oldest_queued_job_id"] == data["queued"]
    assert s["oldest_queued_age_seconds"] == 8 * 60
    pacs = next(d for d in body["destinations"] if d["name"] == "pacs")
    assert (pacs["pending"], pacs["sent"], pacs["failed"]) == (0, 1, 0)


def test_jobs_filter_search_and_paginate(client: TestClient, data: dict[str, int]) -> None:
    def ids(**params: str | int) -> list[int]:
        r = client.get("/api/jobs", params=params)
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["items"]]

    assert ids() == sorted(data[k] for k in ("done", "failed", "queued", "queued2"))[::-1]
    assert ids(status="failed") == [data["failed"]]
    assert ids(modality="CR", model="cxr-pneumonia") != []
    assert len(ids(q=ACCESSION)) == 3
    assert len(ids(q="1.2.9")) == 1
    assert ids(q="%") == []  # wildcards are escaped
    assert len(ids(**{"from": "2026-03-01T00:00:00", "to": "2026-03-02T00:00:00"})) == 4
    assert ids(**{"from": "2026-03-02T00:00:00"}) == []
    page = client.get("/api/jobs", params={"per_page": 3, "page": 2}).json()
    assert page["total"] == 4 and len(page["items"]) == 1
    assert client.get("/api/jobs", params={"status": "bogus"}).status_code == 422


def test_job_page_has_a_timeline_and_results(client: TestClient, data: dict[str, int]) -> None:
    body = client.get(f"/api/jobs/{data['done']}").json()
    events = [e["event"] for e in body["timeline"]]
    assert events == ["received", "last instance", "complete", "queued", "running", "done",
                      "sent"]
    times = [e["at"] for e in body["timeline"]]
    assert times == sorted(times)
    assert body["job"]["inference_seconds"] == 2.5
    assert body["job"]["accession_number"] == ACCESSION
    (result,) = body["results"]
    assert (result["status"], result["attempts"]) == ("sent", 2)
    download = client.get(f"/api/results/{result['id']}/file")
    assert download.status_code == 200 and download.content == b"DICM-SR"
    assert download.headers["content-type"] == "application/dicom"
    failed = client.get(f"/api/jobs/{data['failed']}").json()
    assert failed["timeline"][-1]["event"] == "failed"
    assert failed["job"]["last_error"] == "ModelError: boom"
    missing = client.get("/api/jobs/999")
    assert missing.status_code == 404 and "not found" in missing.json()["detail"]


def test_retry_cancel_and_resend_are_audited(client: TestClient, factory: Factory,
                                             data: dict[str, int]) -> None:
    r = client.post(f"/api/jobs/{data['failed']}/retry")
    assert r.status_code == 200, r.text
    assert job_status(factory, data["failed"]) is JobStatus.QUEUED
    r = client.post(f"/api/jobs/{data['queued']}/cancel")
    assert r.status_code == 200
    assert job_status(factory, data["queued"]) is JobStatus.CANCELLED
    r = client.post(f"/api/jobs/{data['done']}/resend", json={"destination": "archive"})
    assert r.status_code == 200 and r.json()["message"].startswith("1 object(s)")
    r = client.post(f"/api/jobs/{data['done']}/resend", json={"destination": "pacs"})
    assert r.status_code == 200
    with factory() as s:
        rows = {x.destination: x for x in s.scalars(select(Result))}
    assert rows["archive"].status is ResultStatus.PENDING
    assert rows["pacs"].status is ResultStatus.PENDING and rows["pacs"].attempts == 0
    entries = audit(factory)
    assert [(e.action, e.target) for e in entries] == [
        ("retry", f"job {data['failed']}"), ("cancel", f"job {data['queued']}"),
        ("resend", f"job {data['done']}"), ("resend", f"job {data['done']}")]
    assert all(e.actor == "local@testclient" and e.at == NOW for e in entries)
    shown = client.get("/api/audit").json()
    assert [a["action"] for a in shown] == ["resend", "resend", "cancel", "retry"]


def test_refused_actions_are_json_errors_and_not_audited(client: TestClient, factory: Factory,
                                                         data: dict[str, int]) -> None:
    r = client.post(f"/api/jobs/{data['done']}/retry")
    assert r.status_code == 409 and "re-send" in r.json()["detail"]
    assert client.post(f"/api/jobs/{data['failed']}/cancel").status_code == 409
    assert client.post(f"/api/jobs/{data['queued']}/resend",
                       json={"destination": "pacs"}).status_code == 409
    assert client.post(f"/api/jobs/{data['done']}/resend",
                       json={"destination": "nowhere"}).status_code == 422
    assert client.post("/api/jobs/999/retry").status_code == 404
    assert client.get(f"/api/jobs/{data['done']}/retry").status_code == 405  # POST only
    assert audit(factory) == []


def test_post_needs_the_csrf_token_and_same_origin(client: TestClient, factory: Factory,
                                                   data: dict[str, int]) -> None:
    url = f"/api/jobs/{data['failed']}/retry"
    r = client.post(url, headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 403
    r = client.post(url, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    assert job_status(factory, data["failed"]) is JobStatus.FAILED
    assert client.post(url, headers={"Origin": "http://127.0.0.1:8080"}).status_code == 200


def test_destinations_echo_is_recorded_and_shown(client: TestClient) -> None:
    r = client.post("/api/destinations/pacs/echo")
    assert r.json() == {"ok": True, "message": "echo ORTHANC from AINODE"}
    assert client.post("/api/destinations/archive/echo").json()["ok"] is False
    assert client.post("/api/destinations/nowhere/echo").status_code == 404
    rows = {d["name"]: d for d in client.get("/api/destinations").json()}
    assert rows["pacs"]["stats"]["last_echo_ok"] is True
    assert rows["archive"]["stats"]["last_echo_ok"] is False
    assert rows["archive"]["ae_title"] == "ARCHIVE"


def test_studies_and_models(client: TestClient, data: dict[str, int]) -> None:
    studies = client.get("/api/studies").json()
    assert studies["total"] == 2
    ct = next(s for s in studies["items"] if s["study_uid"] == "1.2.3")
    assert [se["instance_count"] for se in ct["series"]] == [1, 1, 1] and ct["jobs"] == 3
    assert client.get("/api/studies", params={"q": "OTHER"}).json()["total"] == 1
    models = {m["info"]["name"]: m for m in client.get("/api/models").json()}
    assert models["ct-lung"]["stats"]["average_inference_seconds"] == 2.5
    assert models["cxr-pneumonia"]["info"]["weights_sha256"] == "ab" * 32
    assert models["ct-lung"]["devices"] == ["auto"]


def test_metrics_are_derived_from_the_database(client: TestClient, factory: Factory) -> None:
    text = client.get("/metrics").text
    assert "ainode_instances_received_total 4.0" in text
    assert "ainode_received_bytes_total 4006.0" in text
    assert 'ainode_jobs{state="done"} 1.0' in text
    assert 'ainode_jobs{state="queued"} 2.0' in text
    assert 'ainode_inference_seconds_bucket{le="5.0",model="ct-lung"} 1.0' in text
    assert 'ainode_inference_seconds_count{model="ct-lung"} 1.0' in text
    # Last instance at T0, acknowledged at T0+5 min.
    assert "ainode_turnaround_seconds_sum 300.0" in text
    assert 'ainode_send_failures_total{destination="pacs"} 1.0' in text
    assert "ainode_oldest_queued_job_age_seconds 480.0" in text
    assert "ainode_queue_wait_seconds_count 2.0" in text
    assert "ainode_workers_alive 0.0" in text
    report_presence(factory, "host:42", 42, "cuda:0", NOW)
    assert "ainode_workers_alive 1.0" in client.get("/metrics").text


def test_health_and_readiness(factory: Factory, tmp_path: Path, data: dict[str, int]) -> None:
    (tmp_path / "var").mkdir(exist_ok=True)
    app = create_app(settings_for(tmp_path), factory, models=lambda: MODELS, clock=lambda: NOW,
                     receiver_problem=lambda: None)
    with TestClient(app, base_url=BASE) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 503
        assert {x["name"]: x["ok"] for x in r.json()["checks"]} == {
            "database": True, "storage": True, "workers": False, "dicom": True}
        report_presence(factory, "host:42", 42, "cpu", NOW - timedelta(seconds=3))
        assert c.get("/readyz").status_code == 200
    full = create_app(settings_for(tmp_path, min_free_mb=10**9), factory, models=lambda: MODELS,
                      clock=lambda: NOW, receiver_problem=lambda: "port 11112 not listening")
    with TestClient(full, base_url=BASE) as c:
        checks = {x["name"]: x for x in c.get("/readyz").json()["checks"]}
        assert not checks["storage"]["ok"] and "below" in checks["storage"]["detail"]
        assert not checks["dicom"]["ok"]


def test_worker_presence_goes_stale(factory: Factory) -> None:
    from db.admin import workers

    report_presence(factory, "h:1", 1, "cuda:1", NOW)
    report_presence(factory, "h:1", 1, "cuda:1", NOW + timedelta(seconds=1))  # no write
    (w,) = workers(factory, NOW + timedelta(seconds=20))
    assert w.alive and w.device == "cuda:1" and w.seen_at == NOW
    (w,) = workers(factory, NOW + timedelta(seconds=60))
    assert not w.alive


def test_openapi_schema_and_no_external_assets(client: TestClient) -> None:
    paths = client.get("/api/openapi.json").json()["paths"]
    for path in ("/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/retry",
                 "/api/studies", "/api/models", "/api/summary", "/api/destinations/{name}/echo"):
        assert path in paths
    assert "post" in paths["/api/jobs/{job_id}/cancel"]
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in static_dir().iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", asset.read_text()), asset
        assert client.get(f"/static/{asset.name}").status_code == 200


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_off_loopback_requires_credentials(tmp_path: Path, factory: Factory) -> None:
    with pytest.raises(ConfigError, match="not loopback"):
        create_app(settings_for(tmp_path, 'host = "0.0.0.0"'), factory, models=lambda: MODELS)


def test_password_and_token_authentication(tmp_path: Path, factory: Factory,
                                           data: dict[str, int]) -> None:
    creds = tmp_path / "credentials.toml"
    password, token = hash_secret("s3cret", iterations=1000), hash_secret("tok-123", iterations=1)
    password, token = hash_secret("s3cret", iterations=1000), hash_secret("tok-123", iterations=1)
    creds.write_text(f'username = "admin"\npassword_hash = "{password}"\n'
                     f'token_hash = "{token}"\n')
    settings = settings_for(tmp_path, f'host = "0.0.0.0"\ncredentials_file = "{creds}"')
    app = create_app(settings, factory, models=lambda: MODELS, clock=lambda: NOW)
    with TestClient(app, base_url=BASE) as c:
        r = c.get("/api/summary")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert c.get("/").status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/healthz").status_code == 200
        assert c.get("/api/summary", headers=basic("admin", "wrong")).status_code == 401
        assert c.get("/api/summary", headers=basic("root", "s3cret")).status_code == 401
        assert c.get("/api/summary", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = basic("admin", "s3cret")
        assert c.get("/api/summary", headers=ok).status_code == 200
        # A browser session (Basic) needs the CSRF token; a bearer token does not.
        url = f"/api/jobs/{data['failed']}/retry"
        assert c.post(url, headers=ok).status_code == 403
        token = c.get("/api/session", headers=ok).json()["csrf_token"]
        assert c.post(url, headers={**ok, "X-CSRF-Token": token}).status_code == 200
        bearer = {"Authorization": "Bearer tok-123"}
        assert c.get("/metrics", headers=bearer).status_code == 200
        assert c.post(f"/api/jobs/{data['queued']}/cancel", headers=bearer).status_code == 200
    # Each wrong credential is audited (a request without any is not: a browser's first).
    assert [(e.action, e.actor) for e in audit(factory)] == [
        ("login-failed", "admin@testclient"), ("login-failed", "root@testclient"),
        ("login-failed", "(bearer token)@testclient"),
        ("retry", "admin@testclient"), ("cancel", "token@testclient")]


def test_secret_hashing() -> None:
    encoded = hash_secret("pw", iterations=1000)
    assert encoded.startswith("pbkdf2_sha256$1000$") and "pw" not in encoded.split("$")[2:]
    assert verify_secret("pw", encoded) and not verify_secret("pW", encoded)
    assert not verify_secret("pw", "garbage") and not verify_secret("pw", "md5$1$a$b")


def test_accession_numbers_stay_out_of_logs(client: TestClient, data: dict[str, int],
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client.get("/api/jobs", params={"q": ACCESSION})
    client.post(f"/api/jobs/{data['failed']}/retry")
    client.get(f"/api/jobs/{data['done']}")
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("ainode"))
    assert "retry job" in ours
    assert ACCESSION not in ours  # (the server runs uvicorn without an access log)


def test_catalog_describes_the_builtin_models() -> None:
    from models.registry import builtin_models

    found = {m.name: m for m in catalog(builtin_models)()}
    assert set(found) == {"ct-lung", "cxr-pneumonia"}
    assert found["ct-lung"].modalities == ["CT"]
    cxr = found["cxr-pneumonia"]
    assert cxr.weights_sha256 is not None
    assert re.fullmatch(r"[0-9a-f]{64}", cxr.weights_sha256)
