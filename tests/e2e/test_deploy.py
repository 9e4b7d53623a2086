"""deploy/: the systemd units, install.sh into a staging root, the Orthanc auto-routing."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from db.schema import Instance, Job
from node.settings import DicomSettings, parse_settings
from tests.peers import (
    CHEST_CT,
    ORTHANC,
    Orthanc,
    dcmtk_env,
    free_port,
    port_open,
    start_node,
    stop_process,
    storescu,
    wait_until,
    write_config,
)
from tests.receiver import running_receiver

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = ("ainode.service", "ainode-worker@.service")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze missing")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(ROOT)], check=True, timeout=300)
    (built,) = out.glob("ainode-*.whl")
    return built


def install(root: Path, wheel: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(DEPLOY / "install.sh"), "--root", str(root), "--package", str(wheel),
         "--python", sys.executable, "--pip-args", "--no-deps --no-index", *extra],
        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    root = tmp_path_factory.mktemp("root")
    out = install(root, wheel)
    assert out.returncode == 0, out.stderr
    return root


def test_install_lays_out_a_service(staged: Path) -> None:
    assert (staged / "opt/ainode/venv/bin/ainode").is_file()
    assert os.access(staged / "opt/ainode/venv/bin/ainode", os.X_OK)
    for unit in UNITS:
        assert (staged / "etc/systemd/system" / unit).read_text() == (DEPLOY / unit).read_text()
    config = staged / "etc/ainode/ainode.toml"
    assert config.read_text() == (DEPLOY / "ainode.example.toml").read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    for folder in ("etc/ainode", "var/lib/ainode"):
        assert stat.S_IMODE((staged / folder).stat().st_mode) == 0o750


def test_install_is_idempotent_and_uninstall_keeps_data(tmp_path: Path, wheel: Path) -> None:
    root = tmp_path / "root"
    assert install(root, wheel).returncode == 0
    config = root / "etc/ainode/ainode.toml"
    config.write_text(config.read_text().replace('ae_title = "AINODE"', 'ae_title = "SITE"'))
    (root / "var/lib/ainode/ainode.db").write_text("queue")
    again = install(root, wheel)
    assert again.returncode == 0, again.stderr
    assert "kept the existing" in again.stdout
    assert 'ae_title = "SITE"' in config.read_text()  # the admin's edits survive

    out = install(root, wheel, "--uninstall")
    assert out.returncode == 0, out.stderr
    assert not (root / "opt/ainode").exists()
    assert not (root / "etc/systemd/system/ainode.service").exists()
    assert 'ae_title = "SITE"' in config.read_text()
    assert (root / "var/lib/ainode/ainode.db").read_text() == "queue"

    assert install(root, wheel, "--uninstall", "--purge").returncode == 0
    assert not (root / "etc/ainode").exists() and not (root / "var/lib/ainode").exists()


def test_install_refuses_a_bad_package(tmp_path: Path) -> None:
    out = subprocess.run(["sh", str(DEPLOY / "install.sh"), "--root", str(tmp_path),
                          "--package", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "neither a source tree nor a wheel" in out.stderr


def staged_units(staged: Path, into: Path) -> list[Path]:
    """The units with their paths moved under the staging root (so ExecStart exists)."""
    into.mkdir()
    paths = []
    for unit, name in zip(UNITS, ("ainode.service", "ainode-worker@0.service"), strict=True):
        text = (DEPLOY / unit).read_text().replace("/opt/ainode", str(staged / "opt/ainode"))
        path = into / name
        path.write_text(text)
        paths.append(path)
    return paths


@needs_systemd
def test_units_pass_systemd_analyze_verify(staged: Path, tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    units = staged_units(staged, tmp_path / "units")
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", *map(str, units)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


@needs_systemd
def test_units_are_hardened(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    for unit in UNITS:
        text = (DEPLOY / unit).read_text()
        for line in ("User=ainode", "Restart=on-failure", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", "ReadWritePaths=/var/lib/ainode", "ProtectHome=yes",
                     "PrivateTmp=yes", "CapabilityBoundingSet=\n", "KillSignal=SIGTERM",
                     "StandardOutput=journal"):
            assert line in text, f"{unit}: {line!r}"
        assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in text
        copy = tmp_path / unit.replace("@", "@0")
        copy.write_text(text)
        out = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", str(copy)],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        level = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
        assert level is not None, out.stdout + out.stderr
        assert float(level.group(1)) <= 4.0, out.stdout
    # The node's stop timeout covers the 60 s it gives its workers to finish.
    assert "TimeoutStopSec=90" in (DEPLOY / "ainode.service").read_text()


def test_units_bound_memory_tasks_and_open_files() -> None:
    for unit in UNITS:
        text = (DEPLOY / unit).read_text()
        service = text.split("[Service]", 1)[1].split("[Install]", 1)[0]
        for key in ("MemoryMax", "TasksMax", "LimitNOFILE"):
            (value,) = re.findall(rf"^{key}=(\S+)$", service, re.MULTILINE)
            assert value not in {"infinity", "0"}, f"{unit}: {key}={value}"
        commented = service.split("MemoryMax=", 1)[0].rsplit("\n\n", 1)[1]
        assert "MemoryMax" in commented and "TasksMax" in commented, f"{unit}: undocumented"


def test_example_config_is_valid() -> None:
    settings = parse_settings((DEPLOY / "ainode.example.toml").read_text())
    assert settings.workers.count == 0  # workers come from ainode-worker@N
    assert settings.storage.dir.is_relative_to("/var/lib/ainode")
    assert settings.admin.host == "127.0.0.1"


# --- Orthanc auto-routing ---------------------------------------------------------


def orthanc_with_autoroute(workdir: Path, node_port: int) -> Orthanc:
    """Orthanc from deploy/orthanc/orthanc.json, on free ports, with the Lua script."""
    workdir.mkdir(parents=True)
    config = json.loads((DEPLOY / "orthanc/orthanc.json").read_text())
    http_port, dicom_port = free_port(), free_port()
    config.update({"HttpPort": http_port, "DicomPort": dicom_port,
                   "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
                   "AuthenticationEnabled": False, "StableAge": 1,
                   "LuaScripts": [str(DEPLOY / "orthanc/autoroute.lua")]})
    config["DicomModalities"]["ainode"] = ["AINODE", "127.0.0.1", node_port]
    (workdir / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen([ORTHANC, f"--logfile={workdir / 'orthanc.log'}",
                             str(workdir / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dcmtk_env())
    pacs = Orthanc(proc, http_port, dicom_port, "ORTHANC", workdir)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError((workdir / "orthanc.log").read_text())
        return port_open(http_port) and port_open(dicom_port)

    wait_until(up, 30, what="Orthanc")
    return pacs


@pytest.fixture
def node_scp(tmp_path: Path, factory: sessionmaker[Session], node_port: int) -> Iterator[int]:
    with running_receiver(tmp_path / "node", factory,
                          DicomSettings(ae_title="AINODE", host="127.0.0.1", port=node_port)):
        yield node_port


def store_jobs(pacs: Orthanc) -> list[dict[str, object]]:
    return [j for j in pacs.get("/jobs?expand") if j.get("Type") == "DicomModalityStore"]


@pytest.mark.e2e
def test_orthanc_routes_a_ct_study_once_and_never_our_results(
        tmp_path: Path, node_scp: int, factory: sessionmaker[Session]) -> None:
    pacs = orthanc_with_autoroute(tmp_path / "orthanc", node_scp)
    try:
        files = sorted(CHEST_CT.glob("*.dcm"))[:3]
        assert storescu(pacs.dicom_port, files, aec="ORTHANC").returncode == 0
        def received() -> int:
            with factory() as s:
                return s.query(Instance).count()

        wait_until(lambda: received() == 3, 60, what="the CT routed to the node")
        (study,) = pacs.get("/studies")
        assert pacs.get_bytes(f"/studies/{study}/metadata/AinodeRouted") == b"yes"

        # The node's result arrives in the same study: the study becomes stable again.
        result = pydicom.dcmread(files[0])
        result.SeriesInstanceUID = generate_uid()
        result.SOPInstanceUID = generate_uid()
        result.Manufacturer = "ainode"
        path = tmp_path / "result.dcm"
        result.save_as(path)
        assert storescu(pacs.dicom_port, path, aec="ORTHANC").returncode == 0
        wait_until(lambda: len(pacs.get(f"/studies/{study}/series")) == 2, 30,
                   what="the result in Orthanc")
        wait_until(lambda: pacs.get(f"/studies/{study}")["IsStable"], 30, what="stable again")
        assert len(store_jobs(pacs)) == 1  # routed exactly once
        assert received() == 3
    finally:
        stop_process(pacs.proc)


# --- the service's lifecycle: ready, then SIGTERM mid-job ----------------------------


def _http(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, None


def _jobs(db_path: Path) -> list[tuple[str, int]]:
    engine = create_engine(f"sqlite:///{db_path}")
    try:
        with Session(engine) as s:
            return [(j.status.value, j.attempts) for j in s.scalars(select(Job).order_by(Job.id))]
    finally:
        engine.dispose()


@pytest.mark.e2e
def test_ready_then_sigterm_mid_job_loses_nothing(tmp_path: Path, node_port: int) -> None:
    admin_port = free_port()
    config = write_config(tmp_path / "ainode.toml", port=node_port, storage=tmp_path / "var",
                          routes=[{"name": "ct", "match": {"Modality": "CT"},
                                   "models": ["ct-lung"]}], admin_port=admin_port)
    db_path = tmp_path / "var" / "ainode.db"
    node = start_node(config, node_port, tmp_path / "node.log")
    try:
        _, body = wait_until(lambda: (r := _http(admin_port, "/readyz"))[0] == 200 and r,
                                60, what="/readyz 200")
        assert {c["name"] for c in body["checks"]} == {"database", "storage", "workers", "dicom"}
        assert storescu(node_port, sorted(CHEST_CT.glob("*.dcm"))).returncode == 0
        wait_until(lambda: ("running", 1) in _jobs(db_path), 120, interval=0.05,
                   what="a running job")
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(90) == 0  # clean stop within the unit's TimeoutStopSec
    finally:
        node.stop()
    # The job in hand was finished, or given back without spending an attempt.
    ((status, attempts),) = _jobs(db_path)
    assert (status, attempts) in {("done", 1), ("queued", 0)}
    node = start_node(config, node_port, tmp_path / "node2.log")
    try:
        wait_until(lambda: _jobs(db_path) == [("done", 1)],
                   300, interval=0.5, what="the job done after the restart")
    finally:
        node.stop()
    assert "Traceback" not in (tmp_path / "node.log").read_text()
