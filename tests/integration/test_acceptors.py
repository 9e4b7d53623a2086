"""Several acceptor processes behind one port (dicom.acceptors), with real storescu senders."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from db.engine import make_engine, make_session_factory
from db.schema import Instance
from node.bench.ingest import synthetic_ct
from tests.peers import (
    NodeProcess,
    dcmtk_env,
    free_port,
    start_node,
    wait_until,
    write_config,
)

ACCEPTORS = 2


def _config(tmp_path: Path, port: int, extra_dicom: str = "", admin_port: int | None = None
            ) -> Path:
    config = write_config(tmp_path / "ainode.toml", port=port, storage=tmp_path / "var",
                          workers=0, stable_seconds=3600, admin_port=admin_port)
    text = config.read_text().replace(f"port = {port}\n",
                                      f"port = {port}\nacceptors = {ACCEPTORS}\n{extra_dicom}", 1)
    config.write_text(text)
    return config


def _acceptor_pids(node: NodeProcess) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(node.proc.pid), "-f", "node.cli acceptor"],
                         capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def _send(port: int, files: list[Path], associations: int) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen(["storescu", "-aec", "AINODE", "-aet", "SENDER", "127.0.0.1",
                              str(port), *map(str, files[i::associations])],
                             env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(associations)]


def _recorded(tmp_path: Path) -> int:
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'ainode.db'}")
    try:
        with make_session_factory(engine)() as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return synthetic_ct(tmp_path_factory.mktemp("ct"), slices=40, size=64)


ADMIN_PORT = free_port()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    port = free_port()
    running = start_node(_config(tmp_path, port, admin_port=ADMIN_PORT), port,
                         tmp_path / "node.log")
    yield running
    running.stop()


def _accepted() -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{ADMIN_PORT}/metrics", timeout=10).read()
    for line in text.decode().splitlines():
        if line.startswith('ainode_associations_total{outcome="accepted"}'):
            return float(line.split()[-1])
    return 0.0


def test_associations_are_spread_over_acceptor_processes(
        node: NodeProcess, tmp_path: Path, series: list[Path]) -> None:
    assert len(_acceptor_pids(node)) == ACCEPTORS
    senders = _send(node.port, series, 4)
    for sender in senders:
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out
    wait_until(lambda: _recorded(tmp_path) == len(series), 30, what="all instances recorded")
    files = list((tmp_path / "var" / "instances").rglob("*.dcm"))
    assert len(files) == len(series)
    # every acceptor took associations: each has its own journal with records in it
    journals = sorted((tmp_path / "var" / "journal").glob(f"*-{node.port}-*"))
    assert [j.name.rsplit("-", 1)[1] for j in journals] == [str(i) for i in range(ACCEPTORS)]
    assert all(list(j.glob("*.journal")) for j in journals)
    # association outcomes are counted in the serve process, whichever acceptor had them
    wait_until(lambda: _accepted() == 4, 10, what="4 accepted associations in /metrics")
    node.stop()
    assert node.proc.returncode == 0
    assert not list((tmp_path / "var" / "journal").rglob("*.journal"))  # all retired


def test_a_killed_acceptor_is_restarted_and_the_port_keeps_answering(
        node: NodeProcess, tmp_path: Path, series: list[Path]) -> None:
    before = _acceptor_pids(node)
    os.kill(before[0], signal.SIGKILL)
    after = wait_until(lambda: (p := _acceptor_pids(node)) and len(p) == ACCEPTORS
                       and before[0] not in p and p, 30, what="acceptor restarted")
    assert before[1] in after
    for sender in _send(node.port, series[:10], 4):  # connections reach live acceptors only
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out
    wait_until(lambda: _recorded(tmp_path) == 10, 30, what="instances recorded")
    assert "exited with -9: restarting it" in node.log()


def _acknowledged(output: str) -> set[str]:
    """Files storescu -v saw acknowledged with success."""
    done, current = set(), None
    for line in output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            done.add(current)
    return done


def _recorded_uids(tmp_path: Path) -> set[str]:
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'ainode.db'}")
    try:
        with make_session_factory(engine)() as s:
            return set(s.scalars(select(Instance.sop_uid)))
    finally:
        engine.dispose()


def test_acknowledged_instances_survive_an_acceptor_crash(tmp_path: Path,
                                                          series: list[Path]) -> None:
    """An acceptor dies after writing files but before their rows (its journal holds them);
    the restarted acceptor replays its journal, so every acknowledged instance is recorded."""
    port = free_port()
    marker = tmp_path / "crashed"
    os.environ["AINODE_CRASH_AT"] = f"ingest.files:1:{marker}"
    try:
        running = start_node(_config(tmp_path, port), port, tmp_path / "node.log")
    finally:
        del os.environ["AINODE_CRASH_AT"]
    try:
        senders = [subprocess.Popen(
            ["storescu", "-v", "-aec", "AINODE", "-aet", "SENDER", "127.0.0.1", str(port),
             *map(str, series[i::2])], env=dcmtk_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) for i in range(2)]
        acked = set().union(*(_acknowledged(s.communicate(timeout=120)[0]) for s in senders))
        wait_until(marker.exists, 30, what="the acceptor's crash")
        assert acked
        uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                for f in acked}
        wait_until(lambda: uids <= _recorded_uids(tmp_path), 30,
                   what="acknowledged instances recorded after the replay")
        wait_until(lambda: "journal replay" in running.log(), 10, what="the replay logged")
        for sender in _send(port, series, 1):  # what was refused around the crash, again
            out, _ = sender.communicate(timeout=120)
            assert sender.returncode == 0, out
        wait_until(lambda: _recorded(tmp_path) == len(series), 30, what="all recorded")
    finally:
        running.stop()


def test_refused_source_network_is_closed_by_the_dispatcher(tmp_path: Path,
                                                            series: list[Path]) -> None:
    port = free_port()
    node = start_node(_config(tmp_path, port, 'allowed_networks = ["10.9.0.0/16"]\n'), port,
                      tmp_path / "node.log")
    try:
        sender = _send(port, series[:1], 1)[0]
        sender.communicate(timeout=60)
        assert sender.returncode != 0
        wait_until(lambda: "not in dicom.allowed_networks" in node.log(), 10,
                   what="refusal logged")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            time.sleep(0.2)
            assert conn.recv(1) == b""  # closed at once, never handed to an acceptor
        assert _recorded(tmp_path) == 0
    finally:
        node.stop()
