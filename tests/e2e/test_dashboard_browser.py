"""The dashboard in a real headless browser (Debian's chromium driven by Playwright).

The node's own processes serve it; a chest radiograph pushed with storescu becomes
a job that appears in the live job list without a reload, its page shows the
timeline, and the retry button queues a failed job again (and is audited); a
quarantined study shows its reason as text, and its Retry and Delete buttons work.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from db.schema import Job, JobStatus, Result, ResultStatus, Study
from tests.peers import (
    SAMPLES,
    NodeProcess,
    free_port,
    start_node,
    storescu,
    wait_until,
    write_config,
)

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
CXR = SAMPLES / "chest-xray" / "NIH_CXR14_SC_Covid0000.dcm"  # DX, uncompressed
SCREENSHOT = Path(os.environ.get("AINODE_SCREENSHOT_DIR", "")) if os.environ.get(
    "AINODE_SCREENSHOT_DIR") else None

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed")]


@pytest.fixture
def node(tmp_path: Path, node_port: int) -> Iterator[tuple[NodeProcess, int]]:
    admin_port = free_port()
    config = write_config(
        tmp_path / "ainode.toml", port=node_port, storage=tmp_path / "var",
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": free_port()}],
        routes=[{"name": "cxr", "match": {"Modality": ["CR", "DX"]},
                 "models": ["cxr-pneumonia"], "destinations": ["pacs"]}],
        admin_port=admin_port)
    proc = start_node(config, node_port, tmp_path / "node.log")
    try:
        wait_until(lambda: _get(admin_port, "/healthz"), 30, what="the admin server")
        yield proc, admin_port
    finally:
        proc.stop()


def _get(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'ainode.db'}")
    yield engine
    engine.dispose()


def test_dashboard_shows_a_pushed_job_and_retries_it(node: tuple[NodeProcess, int], db: Engine,
                                                     tmp_path: Path) -> None:
    proc, admin_port = node
    base = f"http://127.0.0.1:{admin_port}"
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
            page.goto(base + "/")
            page.wait_for_selector("#overview .card")
            assert page.locator("[data-count=done] .n").inner_text() == "0"

            # A job pushed through the node appears in the open job list, no reload.
            page.click("nav a[data-nav=jobs]")
            page.wait_for_selector("#job-table")
            assert page.locator("#job-table tbody tr").count() == 0
            out = storescu(proc.port, CXR)
            assert out.returncode == 0, out.stderr
            row = page.locator("#job-table tbody tr").first
            row.wait_for(timeout=60_000)
            page.wait_for_selector("#job-table [data-state=done]", timeout=120_000)
            assert "cxr-pneumonia" in row.inner_text()

            # Its page shows the timeline.
            row.locator("a").first.click()
            page.wait_for_selector("#timeline li[data-event=done]")
            events = page.locator("#timeline li").evaluate_all(
                "els => els.map(e => e.dataset.event)")
            for event in ("received", "complete", "queued", "running", "done"):
                assert event in events
            assert page.locator("#retry").is_disabled()  # done: re-send, not retry
            assert page.locator("#downloads a").count() >= 1  # the produced objects

            if SCREENSHOT is not None:
                page.goto(base + "/#/")
                page.wait_for_selector("[data-count=done] .n >> text=1")
                page.screenshot(path=str(SCREENSHOT / "dashboard.png"), full_page=True)
                page.goto(base + "/#/jobs/1")
                page.wait_for_selector("#timeline li[data-event=done]")
                page.screenshot(path=str(SCREENSHOT / "dashboard-job.png"), full_page=True)

            # Retry works on a failed job: mark this one failed, then click Retry.
            with Session(db) as s, s.begin():
                s.execute(update(Job).values(status=JobStatus.FAILED, last_error="test failure"))
            page.wait_for_selector("#job-error")
            page.wait_for_selector("#retry:not([disabled])")
            page.click("#retry")
            page.wait_for_selector("#flash >> text=queued again")

            def status() -> JobStatus:
                with Session(db) as s:
                    return s.scalars(select(Job.status)).one()

            wait_until(lambda: status() in (JobStatus.QUEUED, JobStatus.RUNNING,
                                            JobStatus.DONE), 10, what="the retried job")
            page.click("nav a[data-nav=audit]")
            page.wait_for_selector("#audit >> text=retry")
            assert "local@127.0.0.1" in page.locator("#audit").inner_text()

            # A quarantined study: its reason is text (never HTML), Retry lifts it.
            reason = "OSError: <b id=injected>unreadable</b>"

            def quarantine() -> None:
                with Session(db) as s, s.begin():
                    s.execute(update(Study).values(quarantine_reason=reason,
                                                   quarantined_at=datetime(2026, 1, 1)))

            def studies() -> list[tuple[str | None, datetime | None]]:
                with Session(db) as s:
                    return [(r.quarantine_reason, r.quarantined_at)
                            for r in s.execute(select(Study.quarantine_reason,
                                                      Study.quarantined_at))]

            quarantine()
            page.click("nav a[data-nav=studies]")
            page.wait_for_selector("#study-table .quarantine-reason")
            assert page.locator("#study-table .quarantine-reason").inner_text() == reason
            assert page.locator("#injected").count() == 0
            page.click("#study-table .study-retry")
            page.wait_for_selector("#flash >> text=released from quarantine")
            assert studies() == [(None, None)]
            page.wait_for_selector("#study-table .quarantine-reason", state="detached")

            # Delete asks first; accepted, the study is gone. (Not while its retried job
            # runs or a result is being sent: let the job end, give its results up.)
            wait_until(lambda: status() not in (JobStatus.QUEUED, JobStatus.RUNNING), 60,
                       what="the retried job to end")
            with Session(db) as s, s.begin():
                s.execute(update(Result).values(status=ResultStatus.FAILED))
            quarantine()
            page.wait_for_selector("#study-table .study-delete")
            page.once("dialog", lambda dialog: dialog.accept())
            page.click("#study-table .study-delete")
            page.wait_for_selector("#flash >> text=deleted")
            assert studies() == []
            assert errors == []
        finally:
            browser.close()
