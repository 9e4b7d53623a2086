"""The operator verbs of the CLI on a real SQLite queue, and C-ECHO against a real SCP."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from db.audit import AuditEntry
from db.queue import claim_job, fail_job, record_instance
from node.cli.main import app
from node.runtime.clock import utcnow
from node.settings import DicomSettings
from tests.conftest import T0, Factory, dispatch, meta
from tests.integration.test_admin_api import ACCESSION, seed
from tests.peers import free_port
from tests.receiver import running_receiver

runner = CliRunner()

#: Rich markup that is not well formed: printed as markup, it makes rich raise MarkupError.
EVIL = "[/]evil[bold]x"


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    path = tmp_path / "ainode.toml"
    path.write_text(f"""
[storage]
dir = "{tmp_path / 'var'}"
[database]
url = "{db_url}"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {free_port()}
""")
    return path


@pytest.fixture
def data(factory: Factory, tmp_path: Path) -> dict[str, int]:
    return seed(factory, tmp_path / "var")


def ainode(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_status_json_and_table(config: Path, data: dict[str, int]) -> None:
    code, output = ainode("status", "--config", str(config), "--json")
    assert code == 0, output
    body = json.loads(output)
    assert body["summary"]["jobs_by_status"]["queued"] == 2
    assert body["destinations"][0]["name"] == "pacs"
    code, output = ainode("status", "--config", str(config))
    assert code == 0 and "Queue" in output and "Destinations" in output


def test_jobs_list_show_and_filters(config: Path, data: dict[str, int]) -> None:
    code, output = ainode("jobs", "list", "-c", str(config), "--json", "--status", "failed")
    assert code == 0, output
    assert [j["id"] for j in json.loads(output)["items"]] == [data["failed"]]
    code, output = ainode("jobs", "list", "-c", str(config), "--json", "-q", ACCESSION)
    assert json.loads(output)["total"] == 3
    code, output = ainode("jobs", "list", "-c", str(config), "--status", "nonsense")
    assert code == 2
    code, output = ainode("jobs", "show", str(data["done"]), "-c", str(config), "--json")
    body = json.loads(output)
    assert [e["event"] for e in body["timeline"]][-1] == "sent"
    code, output = ainode("jobs", "show", str(data["done"]), "-c", str(config))
    assert code == 0 and "Timeline" in output and "SR" in output
    assert ainode("jobs", "show", "999", "-c", str(config))[0] == 1


def test_jobs_retry_cancel_resend_are_audited(config: Path, factory: Factory,
                                              data: dict[str, int]) -> None:
    assert ainode("jobs", "retry", str(data["failed"]), "-c", str(config)) == (
        0, f"job {data['failed']} queued again\n")
    code, output = ainode("jobs", "retry", str(data["failed"]), "-c", str(config))
    assert code == 1 and "retry refused" in output
    assert ainode("jobs", "cancel", str(data["queued"]), "-c", str(config))[0] == 0
    code, output = ainode("jobs", "resend", str(data["done"]), "pacs", "-c", str(config))
    assert code == 0 and "1 object(s)" in output
    assert ainode("jobs", "resend", str(data["done"]), "elsewhere", "-c", str(config))[0] == 2
    with factory() as s:
        entries = list(s.scalars(select(AuditEntry).order_by(AuditEntry.id)))
    assert [e.action for e in entries] == ["retry", "cancel", "resend"]
    assert all(e.actor.startswith("cli:") for e in entries)


def test_studies_list(config: Path, data: dict[str, int]) -> None:
    code, output = ainode("studies", "list", "-c", str(config), "--json")
    assert code == 0
    body = json.loads(output)
    assert body["total"] == 2
    assert sum(se["instance_count"] for st in body["items"] for se in st["series"]) == 4


@pytest.fixture
def hostile(factory: Factory) -> int:
    """A study whose DICOM texts are rich markup, and its failed job: the job id."""
    instance = dataclasses.replace(meta("1.2.66.1.1", series="1.2.66.1", study="1.2.66"),
                                   series_description=EVIL, accession_number="[red]ACC")
    record_instance(factory, instance, T0)
    (job_id,) = dispatch(factory, T0 + timedelta(minutes=5))
    claimed = claim_job(factory, "w:1", T0 + timedelta(minutes=6), 60)
    assert claimed is not None and claimed.id == job_id
    fail_job(factory, job_id, "w:1", T0 + timedelta(minutes=7), f"ValueError: {EVIL}\x1b[2J",
             retry=False)
    return job_id


def test_stored_markup_is_printed_literally(config: Path, hostile: int) -> None:
    code, output = ainode("studies", "list", "-c", str(config))
    assert code == 0, output
    assert EVIL in output  # in a table cell: "CT [/]evil[bold]x (1)", wrapped
    code, output = ainode("jobs", "show", str(hostile), "-c", str(config))
    assert code == 0, output
    words = " ".join(output.split())  # the lines as rich wraps them, joined
    assert f'series 1.2.66.1 "{EVIL}" (study 1.2.66, accession [red]ACC)' in words
    assert f"error: ValueError: {EVIL}\\x1b[2J" in words  # shown, not clearing the screen
    assert "\x1b" not in output
    code, output = ainode("jobs", "list", "-c", str(config), "-q", "[red]ACC")
    assert code == 0, output
    assert "1.2.66" in output


def test_configuration_error_with_markup_is_printed_literally(tmp_path: Path) -> None:
    path = tmp_path / "[" / "]evil[bold]x.toml"  # missing: the error names it
    code, output = ainode("check-config", str(path))
    assert code == 2, output
    assert f"{path}:cannotread" in "".join(output.split())  # as rich folds it, rejoined


@pytest.fixture
def scp(tmp_path: Path, factory: Factory) -> Iterator[int]:
    port = free_port()
    with running_receiver(tmp_path / "scp", factory,
                          DicomSettings(ae_title="PACS", host="127.0.0.1", port=port)):
        yield port


# pynetdicom leaves the socket of a refused connection for the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_destinations_echo_records_the_outcome(tmp_path: Path, config: Path, scp: int,
                                               factory: Factory) -> None:
    # The configured port has no listener: the echo fails, exit 1.
    code, output = ainode("destinations", "echo", "-c", str(config), "--json")
    assert code == 1 and json.loads(output)[0]["ok"] is False
    config.write_text(config.read_text().replace(
        config.read_text().split("port = ")[-1], f"{scp}\n"))
    code, output = ainode("destinations", "echo", "pacs", "-c", str(config))
    assert code == 0, output
    assert "C-ECHO success" in output
    code, output = ainode("destinations", "list", "-c", str(config), "--json")
    (row,) = json.loads(output)
    assert row["stats"]["last_echo_ok"] is True and row["ae_title"] == "PACS"
    assert datetime.fromisoformat(row["stats"]["last_echo_at"]) <= utcnow()
    assert ainode("destinations", "echo", "nowhere", "-c", str(config))[0] == 2


def test_hash_secret_verifies() -> None:
    from node.admin.secrets import verify_secret

    code, output = ainode("hash-secret", "--secret", "hunter2")
    assert code == 0
    assert verify_secret("hunter2", output.strip().splitlines()[-1])
