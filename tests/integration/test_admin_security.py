"""The admin server's defences, through real requests: Host check (DNS rebinding), body
size limit, failed-login logging, auditing and lock-out, cached verification in
constant time, and bounded numbers in URLs."""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from db.schema import JobStatus
from node.admin.app import create_app
from node.admin.secrets import hash_secret
from node.admin.server import AdminServer
from node.errors import ConfigError
from tests.conftest import Factory
from tests.integration.test_admin_api import (
    BASE,
    MODELS,
    NOW,
    audit,
    basic,
    fake_echo,
    job_status,
    seed,
    settings_for,
)
from tests.peers import free_port

OK = basic("admin", "s3cret")
BEARER = {"Authorization": "Bearer tok-123"}


@pytest.fixture
def data(factory: Factory, tmp_path: Path) -> dict[str, int]:
    return seed(factory, tmp_path / "var")


def secured(extra: str = "", iterations: int = 1000) -> str:
    """An ``[admin]`` section bound to every address, with a password and a token."""
    password = hash_secret("s3cret", iterations=iterations)
    token = hash_secret("tok-123", iterations=iterations)
    return (f'host = "0.0.0.0"\nusername = "admin"\npassword_hash = "{password}"\n'
            f'token_hash = "{token}"\n{extra}')


def app_for(tmp_path: Path, factory: Factory, admin: str = "",
            clock: Callable[[], datetime] = lambda: NOW) -> FastAPI:
    return create_app(settings_for(tmp_path, admin), factory, models=lambda: MODELS,
                      clock=clock, echo=fake_echo)


@pytest.fixture
def client(factory: Factory, tmp_path: Path, data: dict[str, int]) -> Iterator[TestClient]:
    with TestClient(app_for(tmp_path, factory), base_url=BASE) as c:
        c.headers["X-CSRF-Token"] = c.get("/api/session").json()["csrf_token"]
        yield c


# --- 1. Host header (DNS rebinding) --------------------------------------------------


def test_a_foreign_host_header_is_refused(client: TestClient, factory: Factory,
                                          data: dict[str, int]) -> None:
    download = f"/api/results/{data['result']}/file"
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example",
                 "[::2]:8080", "localhost:http", "::1"):
        for url in ("/api/studies", download, "/", "/metrics"):
            r = client.get(url, headers={"Host": host})
            assert r.status_code == 400, (host, url)
            assert "allowed_hosts" in r.json()["detail"]
            assert r.headers["x-frame-options"] == "DENY"
    for host in ("127.0.0.1:8080", "127.0.0.1", "localhost:8080", "LOCALHOST", "[::1]:8080",
                 "[::1]"):
        assert client.get("/api/studies", headers={"Host": host}).status_code == 200, host
    assert client.get(download, headers={"Host": "localhost:8080"}).content == b"DICM-SR"


def test_a_rebinding_page_cannot_act_even_with_a_csrf_token(client: TestClient,
                                                            factory: Factory,
                                                            data: dict[str, int]) -> None:
    """Under the attacker's name the page is same-origin to the browser: Origin == Host."""
    evil = {"Host": "evil.example:8080", "Origin": "http://evil.example:8080"}
    assert client.get("/api/session", headers=evil).status_code == 400
    r = client.post(f"/api/jobs/{data['failed']}/retry", headers=evil)
    assert r.status_code == 400
    assert job_status(factory, data["failed"]) is JobStatus.FAILED and audit(factory) == []
    # An allowed Origin must also be the Host the request went to.
    r = client.post(f"/api/jobs/{data['failed']}/retry",
                    headers={"Host": "localhost:8080", "Origin": "http://127.0.0.1:8080"})
    assert r.status_code == 403
    r = client.post(f"/api/jobs/{data['failed']}/retry",
                    headers={"Host": "localhost:8080", "Origin": "http://localhost:8080"})
    assert r.status_code == 200


def test_allowed_hosts_default_and_setting(tmp_path: Path, factory: Factory) -> None:
    own = settings_for(tmp_path, secured().replace("0.0.0.0", "10.1.2.3"))
    assert own.admin.allowed_hosts == ["127.0.0.1", "localhost", "[::1]", "10.1.2.3"]
    app = create_app(own, factory, models=lambda: MODELS, clock=lambda: NOW)
    with TestClient(app, base_url="http://10.1.2.3:8080") as c:
        assert c.get("/api/summary", headers=OK).status_code == 200
        assert c.get("/api/summary", headers={**OK, "Host": "10.1.2.4"}).status_code == 400
    named = 'allowed_hosts = ["ainode.example.org", "fd00::7"]'
    assert settings_for(tmp_path, named).admin.allowed_hosts == ["ainode.example.org",
                                                                  "[fd00::7]"]
    with TestClient(app_for(tmp_path, factory, named), base_url=BASE) as c:
        assert c.get("/api/summary").status_code == 400  # loopback no longer listed
        for host in ("ainode.example.org", "AINODE.example.org:443", "[fd00::7]:8080"):
            assert c.get("/api/summary", headers={"Host": host}).status_code == 200, host
    with pytest.raises(ConfigError, match=r"admin\.allowed_hosts"):
        settings_for(tmp_path, 'allowed_hosts = ["http://ainode.example.org:8080"]')


# --- 2. Credentials: cached, constant time -------------------------------------------


def test_credentials_are_verified_once_and_unknown_users_take_as_long(
        tmp_path: Path, factory: Factory, data: dict[str, int]) -> None:
    app = app_for(tmp_path, factory, secured(iterations=2_000_000))  # ~0.5 s per check

    with TestClient(app, base_url=BASE) as c:
        def timed(headers: dict[str, str], expect: int) -> float:
            start = time.perf_counter()
            assert c.get("/api/session", headers=headers).status_code == expect
            return time.perf_counter() - start

        for valid in (BEARER, OK):
            first = timed(valid, 200)
            assert sum(timed(valid, 200) for _ in range(4)) < first  # no PBKDF2 again
        wrong_password = timed(basic("admin", "guess"), 401)
        unknown_user = timed(basic("nobody", "guess"), 401)
        assert unknown_user > wrong_password / 4


# --- 3. Failed logins: logged, audited, locked out --------------------------------------


def test_a_failed_login_is_logged_and_audited(tmp_path: Path, factory: Factory,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ainode")
    app = app_for(tmp_path, factory, secured())
    with TestClient(app, base_url=BASE, client=("203.0.113.7", 50000)) as c:
        assert c.get("/api/summary").status_code == 401  # no credentials: a browser's first
        r = c.get("/api/summary", headers=basic("root\x1b[2J\nfake", "guess"))
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert c.get("/api/summary", headers={"Authorization": "Bearer nope"}).status_code == 401
        shown = c.get("/api/audit", headers=OK).json()
    assert [(a["action"], a["actor"], a["target"]) for a in shown] == [
        ("login-failed", "(bearer token)@203.0.113.7", "admin"),
        ("login-failed", "root\\x1b[2J\\nfake@203.0.113.7", "admin")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "failed login" in r.getMessage()]
    assert warnings == ["admin: failed login from 203.0.113.7 as root\\x1b[2J\\nfake",
                        "admin: failed login from 203.0.113.7 as (bearer token)"]


def test_repeated_failures_lock_the_address_out(tmp_path: Path, factory: Factory,
                                                data: dict[str, int]) -> None:
    now = [NOW]
    app = app_for(tmp_path, factory, secured(), clock=lambda: now[0])
    with (TestClient(app, base_url=BASE, client=("203.0.113.7", 50000)) as c,
          TestClient(app, base_url=BASE, client=("198.51.100.2", 50000)) as other):
        def fail(n: int) -> None:
            for _ in range(n):
                assert c.get("/api/summary", headers=basic("admin", "guess")).status_code == 401

        fail(9)
        now[0] += timedelta(seconds=61)  # those nine are out of the window
        fail(9)
        assert c.get("/api/summary", headers=OK).status_code == 200
        fail(1)  # the tenth within 60 s
        for headers in (OK, BEARER, basic("admin", "guess")):  # nothing is checked now
            r = c.get("/api/summary", headers=headers)
            assert r.status_code == 429 and r.headers["retry-after"] == "60"
        assert other.get("/api/summary", headers=OK).status_code == 200
        now[0] += timedelta(seconds=30)
        assert c.get("/api/summary", headers=OK).headers["retry-after"] == "30"
        now[0] += timedelta(seconds=31)
        assert c.get("/api/summary", headers=OK).status_code == 200
    failed = [e for e in audit(factory) if e.action == "login-failed"]
    assert len(failed) == 19  # the refused (429) requests are not audited
    assert [e.detail for e in failed].count("address locked out") == 1


def test_lockout_settings(tmp_path: Path, factory: Factory) -> None:
    now = [NOW]
    app = app_for(tmp_path, factory, secured("max_failed_logins = 2\nlockout_seconds = 5"),
                  clock=lambda: now[0])
    with TestClient(app, base_url=BASE) as c:
        for expect in (401, 401, 429):
            assert c.get("/api/summary", headers=basic("admin", "x")).status_code == expect
        now[0] += timedelta(seconds=5)
        assert c.get("/api/summary", headers=OK).status_code == 200


# --- 4. Body size -------------------------------------------------------------------


def test_a_big_body_is_refused_unread_before_authentication(tmp_path: Path, factory: Factory,
                                                            data: dict[str, int]) -> None:
    pulled: list[int] = []

    def body() -> Iterator[bytes]:
        for i in range(64):
            pulled.append(i)
            yield b" " * 1024 * 1024

    app = app_for(tmp_path, factory, secured())
    with TestClient(app, base_url=BASE) as c:
        r = c.post(f"/api/jobs/{data['done']}/resend", content=body(),
                   headers={"Content-Length": str(64 * 1024 * 1024),
                            "Content-Type": "application/json"})
        assert r.status_code == 413 and "max_body_kb" in r.json()["detail"]
        assert pulled == []
        big = b" " * (1024 * 1024 + 1)
        assert c.post("/api/summary", content=big).status_code == 413  # not 401
        assert c.post(f"/api/jobs/{data['done']}/resend", content=big, headers=BEARER,
                      ).status_code == 413
        assert c.post(f"/api/jobs/{data['done']}/resend", content=b" " * 1024 * 1024,
                      headers=BEARER).status_code == 422  # at the limit: parsed (not JSON)
    small = app_for(tmp_path, factory, "max_body_kb = 1")
    with TestClient(small, base_url=BASE) as c:
        r = c.post(f"/api/jobs/{data['done']}/resend", json={"destination": "x" * 2000})
        assert r.status_code == 413
        r = c.post(f"/api/jobs/{data['done']}/resend", json={"destination": "x" * 900})
        assert r.status_code == 403  # within the limit: on to the CSRF check


def test_a_streamed_body_is_cut_off_at_the_limit(tmp_path: Path, factory: Factory,
                                                 data: dict[str, int]) -> None:
    """Chunked (no Content-Length) to a real server: 413 once 64 KiB have arrived."""
    app = app_for(tmp_path, factory, secured("max_body_kb = 64"))
    port = free_port()
    server = AdminServer(app, "127.0.0.1", port)
    server.start()
    try:
        sent, reply = _stream_until_answered(port, f"/api/jobs/{data['done']}/resend")
    finally:
        server.stop()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 32 * 1024 * 1024  # of the 256 MiB it would have sent


def _stream_until_answered(port: int, path: str) -> tuple[int, bytes]:
    """POST an endless chunked body until the server answers; bytes sent and the answer."""
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     .encode())
        while sent < 256 * 1024 * 1024 and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            sent += 0x10000
        return sent, sock.recv(4096)


# --- 5. Numbers in URLs ---------------------------------------------------------------


def test_out_of_range_numbers_are_422_not_500(client: TestClient) -> None:
    huge = 10**20
    for url in ("/api/studies?page=1e20", f"/api/studies?page={huge}",
                f"/api/jobs?page={huge}", "/api/jobs?page=1000001",
                f"/api/jobs?per_page={huge}", f"/api/jobs/{huge}", "/api/jobs/0",
                f"/api/results/{huge}/file", "/api/audit?limit=1e20"):
        r = client.get(url)
        assert r.status_code == 422, (url, r.status_code)
    assert client.post(f"/api/jobs/{huge}/retry").status_code == 422
    assert client.post(f"/api/jobs/{huge}/resend", json={"destination": "pacs"}
                       ).status_code == 422
    page = client.get("/api/jobs", params={"page": 1_000_000, "per_page": 200}).json()
    assert page["items"] == [] and page["total"] == 4
    assert client.get(f"/api/jobs/{2**63 - 1}").status_code == 404
