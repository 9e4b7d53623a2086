"""Real DICOM peers for the tests: Orthanc, dcmtk, dciodvfy, and the node's own processes.

Every process started here is stopped by PID when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SAMPLES = SHARED / "dicom-samples"
CHEST_CT = SAMPLES / "chest-ct-lung-pet-ct-dx-a0002"
ORTHANC = "/usr/sbin/Orthanc"
DCIODVFY_ERROR = re.compile(r"(^|\s-\s)(Error|Abort) - ")
DCIODVFY_WARNING = re.compile(r"(^|\s-\s)Warning - ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_process(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(port: int, files: list[Path] | Path, *, aec: str = "AINODE", aet: str = "STORESCU",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk storescu (``-R``: propose only what the files need)."""
    paths = [files] if isinstance(files, Path) else files
    cmd = ["storescu", "-v", "-R", "-nh", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port),
           *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dcmtk_env())


def echoscu(port: int, *, aec: str = "AINODE", aet: str = "ECHOSCU") -> int:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, timeout=30, env=dcmtk_env()).returncode


class Verdict(NamedTuple):
    """What dciodvfy said about one file: its error lines and its warning lines."""

    errors: list[str]
    warnings: list[str]


def dciodvfy(path: Path) -> Verdict:
    """Run dciodvfy on ``path`` (it writes to stderr); print the counts and the lines."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120,
                         check=False)
    lines = (out.stderr + out.stdout).splitlines()
    verdict = Verdict(errors=[line for line in lines if DCIODVFY_ERROR.search(line)],
                      warnings=[line for line in lines if DCIODVFY_WARNING.search(line)])
    print(f"dciodvfy {path.name}: {len(verdict.errors)} errors, {len(verdict.warnings)} warnings")
    for line in verdict.errors + verdict.warnings:
        print(f"  {line}")
    return verdict


@dataclass
class Orthanc:
    """A real Orthanc on loopback ports of its own, acting as the PACS."""

    proc: subprocess.Popen[bytes]
    http_port: int
    dicom_port: int
    aet: str
    workdir: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=30) as resp:
            return json.loads(resp.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url(path), timeout=30) as resp:
            return bytes(resp.read())

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url(path), data=data, method="POST")
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None

    def find_series(self, study_uid: str, modality: str) -> list[str]:
        return list(self.post("/tools/find", {"Level": "Series", "Query": {
            "StudyInstanceUID": study_uid, "Modality": modality}}))

    def stop(self) -> None:
        stop_process(self.proc)


def start_orthanc(workdir: Path, node_port: int, *, aet: str = "ORTHANC",
                  dicom_port: int | None = None, http_port: int | None = None) -> Orthanc:
    workdir.mkdir(parents=True, exist_ok=True)
    http_port = http_port or free_port()
    dicom_port = dicom_port or free_port()
    config = {
        "Name": "test-pacs", "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": aet,
        "DicomCheckCalledAet": True, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [],
        "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
        "DicomModalities": {"AINODE": ["AINODE", "127.0.0.1", node_port]},
        "StableAge": 3600,
        "OverwriteInstances": True,  # as deploy/orthanc: a new run's results replace the last
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config))
    proc = subprocess.Popen([ORTHANC, f"--logfile={workdir / 'orthanc.log'}", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dcmtk_env())
    pacs = Orthanc(proc, http_port, dicom_port, aet, workdir)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited: see {workdir / 'orthanc.log'}")
        try:
            pacs.get("/system")
        except (urllib.error.URLError, ConnectionError):
            return False
        return port_open(dicom_port)

    wait_until(ready, 30, what="Orthanc")
    return pacs


def write_config(path: Path, *, port: int, storage: Path, db_url: str | None = None,
                 destinations: list[dict[str, Any]] | None = None,
                 routes: list[dict[str, Any]] | None = None, stable_seconds: float = 1.0,
                 workers: int = 1, extra: str = "", admin_port: int | None = None) -> Path:
    """Write a node config TOML for a test."""
    db_url = db_url or f"sqlite:///{storage / 'ainode.db'}"
    lines = [
        "[dicom]", 'ae_title = "AINODE"', 'host = "127.0.0.1"', f"port = {port}",
        "[storage]", f'dir = "{storage}"', "min_free_mb = 1",
        "[database]", f'url = "{db_url}"',
        "[study]", f"stable_seconds = {stable_seconds}", "check_interval_seconds = 0.5",
        "stable_seconds_by_modality = {}",
        "[workers]", f"count = {workers}", 'device = "cpu"', "lease_seconds = 6",
        "heartbeat_seconds = 1", "poll_seconds = 0.2",
        "[send]", "backoff_base_seconds = 0.5", "backoff_max_seconds = 2",
        "interval_seconds = 0.5", "max_attempts = 50", "timeout_seconds = 10",
        "breaker_open_seconds = 2",
        "[logging]", 'level = "INFO"',
        "[admin]", f"port = {admin_port or free_port()}",
    ]
    for dest in destinations or []:
        lines += ["[[destinations]]", *(f"{k} = {json.dumps(v)}" for k, v in dest.items())]
    for route in routes or []:
        lines.append("[[routes]]")
        for key, value in route.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {inner} }}")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@dataclass
class NodeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, timeout=60)
        with contextlib.suppress(ProcessLookupError):  # its workers are in its process group
            os.killpg(self.proc.pid, signal.SIGKILL)


def ainode(*args: str, log_path: Path, env: dict[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    """Start ``ainode ARGS`` (the installed console script's module) with its log in a file."""
    with log_path.open("ab") as handle:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "node.cli", *args], stdout=handle,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=ROOT, start_new_session=True)


def start_node(config: Path, port: int, log_path: Path) -> NodeProcess:
    proc = ainode("serve", "--config", str(config), log_path=log_path)
    node = NodeProcess(proc, port, log_path)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"ainode serve exited {proc.returncode}:\n{node.log()}")
        return port_open(port)

    wait_until(up, 60, what="ainode serve")
    return node


def stage_series(factory: Any, store: Path, files: list[Path], model: str,
                 destinations: tuple[str, ...] = (), max_attempts: int = 3) -> None:
    """Put ``files`` in the node's storage and database as if received, and queue one job
    per series for ``model`` (the study is already quiet), without the network."""
    import shutil
    from datetime import timedelta

    import pydicom

    from db.queue import (
        InstanceMeta,
        JobPlan,
        SeriesInfo,
        dispatch_stable_studies,
        record_instance,
    )
    from node.runtime.clock import utcnow

    now = utcnow()
    (store / "instances").mkdir(parents=True, exist_ok=True)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rel = Path("instances") / f"{ds.SOPInstanceUID}.dcm"
        shutil.copy(path, store / rel)
        record_instance(factory, InstanceMeta(
            study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
            sop_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), path=str(rel), size=1,
            calling_ae="T", modality=str(ds.get("Modality", ""))), now)

    def plan(series: SeriesInfo) -> list[JobPlan]:
        return [JobPlan(series.id, model, "r", destinations)]

    dispatch_stable_studies(factory, now + timedelta(seconds=120), lambda _: 60, plan,
                            max_attempts)
