"""Crash harness: SIGKILL the node or its worker at seeded random points, restart, check invariants.

Kill points (``node/faults.py``): during an association before anything is
written, after the journal made an instance durable but before the answer,
between the instance files and their rows, after inference, between the result
files and the job's completion, and between the PACS's acknowledgement of a
result and its recording. After each crash the node is restarted and the PACS
(Orthanc) re-sends what it did not see acknowledged, as a PACS does. Then:

* every acknowledged instance is on disk (same bytes) and in the database;
* every study has exactly one result set in Orthanc: one series per kind with one
  instance (a resend after a crash between store and record reuses the SOP
  Instance UIDs, so Orthanc overwrites instead of duplicating);
* no job is stuck (all done), every outbox row is sent;
* no orphan files: no instance file without its row, no temp file, no journal left.

``AINODE_CRASH_ITERATIONS`` (default 6) and ``AINODE_CRASH_SEED`` (default 20261123)
bound and seed the run.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from db.schema import Instance, Job, JobStatus, Result, ResultStatus
from node.runtime.faults import ENV, POINTS
from tests.peers import (
    CHEST_CT,
    SAMPLES,
    NodeProcess,
    Orthanc,
    ainode,
    port_open,
    stop_process,
    storescu,
    wait_until,
    write_config,
)
from tests.pg import pg_url_fixture, postgres_fixture  # noqa: F401

pytestmark = pytest.mark.e2e
ITERATIONS = int(os.environ.get("AINODE_CRASH_ITERATIONS", "6"))
SEED = int(os.environ.get("AINODE_CRASH_SEED", "20261123"))
RADIOGRAPH = SAMPLES / "chest-xray" / "NIH_CXR14_SC_Covid0000.dcm"
KINDS = {"DX": ("SR", "SEG"), "CT": ("SEG", "SR")}  # the radiograph's SEG is its heatmap


def new_study(sources: list[Path], out: Path) -> list[Path]:
    """Copies of ``sources`` as a new study (new study, series and SOP Instance UIDs)."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = out / f"{i:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def acknowledged(output: str, files: list[Path]) -> set[Path]:
    """Files storescu saw acknowledged with success (its verbose log, file by file)."""
    done: set[Path] = set()
    current: Path | None = None
    for line in output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = Path(sending.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            done.add(current)
    return done & set(files)


def start(config: Path, port: int, log: Path, crash: str | None) -> NodeProcess:
    env = {ENV: crash} if crash else {}
    proc = ainode("serve", "--config", str(config), log_path=log, env=env)
    node = NodeProcess(proc, port, log)
    wait_until(lambda: port_open(node.port) or proc.poll() is not None, 60, what="node up")
    return node


def alive(node: NodeProcess) -> bool:
    return node.proc.poll() is None


@pytest.fixture(params=["sqlite", "postgresql"])
def node_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The node's database: a SQLite file, or a real PostgreSQL server (tests/pg.py)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'var' / 'ainode.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def db(node_db_url: str) -> Iterator[Engine]:
    engine = create_engine(node_db_url)
    yield engine
    engine.dispose()


def check_invariants(tmp_path: Path, db: Engine, pacs: Orthanc, sent: dict[Path, bytes],
                     studies: dict[str, str]) -> None:
    store = tmp_path / "var"
    with Session(db) as s:
        rows = {r.sop_uid: r.path for r in s.scalars(select(Instance))}
        jobs = list(s.scalars(select(Job)))
        results = list(s.scalars(select(Result)))
    # Every acknowledged instance is on disk, byte for byte, and in the database.
    for path in sent:
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert sop in rows, f"acknowledged {path.name} lost"
        stored = pydicom.dcmread(store / rows[sop])
        assert stored.PixelData == pydicom.dcmread(path).PixelData
    # No job stuck, everything delivered.
    assert jobs and all(j.status is JobStatus.DONE for j in jobs), \
        [(j.id, j.status, j.last_error) for j in jobs]
    assert results and all(r.status is ResultStatus.SENT for r in results)
    # Exactly one result set per study in the PACS.
    for study, modality in studies.items():
        for kind in KINDS[modality]:
            series = pacs.find_series(study, kind)
            assert len(series) == 1, (study, kind, series)
            assert len(pacs.get(f"/series/{series[0]}")["Instances"]) == 1, (study, kind)
    # No orphan: every instance file has its row; no temp files; no journal segment left.
    files = {str(p.relative_to(store)) for p in (store / "instances").rglob("*.dcm")}
    assert files == set(rows.values())
    assert not list(store.rglob("*.tmp"))
    assert not list((store / "journal").rglob("*.journal"))


def test_kill_at_random_points_loses_nothing_and_duplicates_nothing(
        tmp_path: Path, node_port: int, orthanc: Orthanc, db: Engine, node_db_url: str) -> None:
    rng = random.Random(SEED)
    config = write_config(
        tmp_path / "ainode.toml", port=node_port, storage=tmp_path / "var", db_url=node_db_url,
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                       "port": orthanc.dicom_port, "objects": ["SEG", "SR", "HEATMAP"]}],
        routes=[{"name": "cxr", "match": {"Modality": ["CR", "DX"]},
                 "models": ["cxr-pneumonia"], "destinations": ["pacs"]},
                {"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-lung"],
                 "destinations": ["pacs"]}])
    sent: dict[Path, bytes] = {}
    studies: dict[str, str] = {}
    fired: list[str] = []
    ct_sources = sorted(CHEST_CT.glob("*.dcm"))
    for i in range(ITERATIONS):
        point = POINTS[i % len(POINTS)] if i < len(POINTS) else rng.choice(POINTS)
        # ingest.files is reached once per batch of rows, which may hold all the instances
        hits = 1 if point == "ingest.files" else rng.randint(1, 2)
        marker = tmp_path / f"crash-{i}"
        files: list[Path] = []
        for j in range(2):
            files += new_study([RADIOGRAPH], tmp_path / f"it{i}-dx{j}")
        if point.startswith(("worker", "ingest")) and i % 2 == 0:
            files += new_study(ct_sources, tmp_path / f"it{i}-ct")
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            studies[str(ds.StudyInstanceUID)] = "CT" if ds.Modality == "CT" else "DX"

        node = start(config, node_port, tmp_path / f"node-{i}.log", f"{point}:{hits}:{marker}")
        pending = list(files)
        for _attempt in range(6):  # the PACS re-sends what was not acknowledged
            if not pending:
                break
            if not alive(node) or not port_open(node.port):
                node.stop()
                node = start(config, node_port, tmp_path / f"node-{i}-restart.log", None)
            out = storescu(node.port, pending)
            ok = acknowledged(out.stderr + out.stdout, pending)
            sent.update({p: p.read_bytes() for p in ok})
            pending = [p for p in pending if p not in ok]
        assert not pending, f"iteration {i}: never acknowledged {pending}"

        def settled() -> bool:
            with Session(db) as s:
                open_jobs = s.scalar(select(func.count()).select_from(Job).where(
                    Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])))
                unsent = s.scalar(select(func.count()).select_from(Result).where(
                    Result.status != ResultStatus.SENT))
                done = s.scalar(select(func.count()).select_from(Job))
            return bool(done) and open_jobs == 0 and unsent == 0 and all(
                pacs_has(study) for study in studies)

        def pacs_has(study: str) -> bool:
            return all(orthanc.find_series(study, k) for k in KINDS[studies[study]])

        try:
            def settled_or_dead(running: NodeProcess = node) -> bool:
                return settled() or not alive(running)

            wait_until(settled_or_dead, 240, interval=0.5,
                       what=f"iteration {i} ({point}:{hits}) settles")
            if not alive(node) or not settled():
                node.stop()  # crashed (or its worker did): restart it as systemd would
                node = start(config, node_port, tmp_path / f"node-{i}-after.log", None)
                wait_until(settled, 240, interval=0.5, what=f"iteration {i} settles after restart")
        finally:
            stop_process(node.proc, timeout=60)
            node.stop()
        if marker.exists():
            fired.append(f"{point}:{hits}")
        check_invariants(tmp_path, db, orthanc, sent, studies)
    print(f"crash harness: {ITERATIONS} kill points tried (seed {SEED}), "
          f"{len(fired)} fired: {', '.join(fired)}")
    if len(POINTS) <= ITERATIONS:  # the harness really kills, at every point
        assert {f.split(":")[0] for f in fired} == set(POINTS)
