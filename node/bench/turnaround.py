"""Turnaround benchmark: last instance acknowledged to the results acknowledged by the PACS.

Starts a real Orthanc (the PACS) and ``ainode serve`` on loopback, pushes a
300-slice chest CT (the real sample resampled along z, new UIDs) and a real
chest radiograph with dcmtk ``storescu``, and splits each turnaround into
stability wait, queue wait, loading, inference, encoding and sending, from the
node's database timestamps and its worker's timing line.

Run: ``python -m node.bench.turnaround`` (``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from db.schema import Job, Result, Study
from node.bench.inference import DEFAULT_SAMPLES
from node.bench.ingest import ENV, free_port, machine, wait_port


def thin_ct(source: Path, out: Path, slices: int) -> list[Path]:
    """The sample CT resampled to ``slices`` slices, written as a new study."""
    datasets = sorted((pydicom.dcmread(p) for p in source.glob("*.dcm")),
                      key=lambda d: float(d.ImagePositionPatient[2]))
    raw = torch.from_numpy(np.stack([d.pixel_array.astype(np.float32) for d in datasets]))
    grid = F.interpolate(raw[None, None], size=(slices, *raw.shape[1:]), mode="trilinear",
                         align_corners=True)[0, 0].round().clamp(0, 65535).to(torch.int32)
    z0, z1 = (float(datasets[i].ImagePositionPatient[2]) for i in (0, -1))
    step = (z1 - z0) / (slices - 1)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(slices):
        ds = datasets[0].copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [*list(datasets[0].ImagePositionPatient)[:2], z0 + i * step]
        ds.SliceLocation = z0 + i * step
        ds.SliceThickness = abs(step)
        ds.PixelData = grid[i].numpy().astype(np.uint16).tobytes()
        path = out / f"{i:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def new_study(source: Path, out: Path) -> Path:
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out)
    return out


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def find(http: int, study: str, modality: str) -> list[Any]:
    body = json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study,
                                                    "Modality": modality}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{http}/tools/find", data=body)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return list(json.loads(resp.read()))


def measure(files: list[Path], extra: list[str], node_port: int, http: int, db: Path,
            log: Path, wanted: tuple[str, ...]) -> dict[str, float]:
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    out = subprocess.run(["storescu", "-aec", "AINODE", *extra, "127.0.0.1", str(node_port),
                          *map(str, files)], env=ENV, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-500:])
    acked = time.time()
    while not all(find(http, study, m) for m in wanted):
        if time.time() - acked > 600:
            raise TimeoutError("no results in Orthanc")
        time.sleep(0.05)
    engine = create_engine(f"sqlite:///{db}")
    with Session(engine) as s:
        row = s.scalars(select(Study).where(Study.study_uid == study)).one()
        job = s.scalars(select(Job).where(Job.study_id == row.id)).one()
        sent = max(r.sent_at for r in s.scalars(select(Result).where(Result.job_id == job.id))
                   if r.sent_at is not None)
        assert job.started_at and job.finished_at and row.completed_at
        timings = re.search(rf"job {job.id} timings: load ([\d.]+) s, inference ([\d.]+) s, "
                            r"encode ([\d.]+) s", log.read_text())
        assert timings is not None
        load, infer, encode = (float(v) for v in timings.groups())
        figures = {
            "stability wait": (row.completed_at - row.last_received_at).total_seconds(),
            "queue wait": (job.started_at - job.created_at).total_seconds(),
            "loading": load, "inference": infer, "encoding": encode,
            "sending": (sent - job.finished_at).total_seconds(),
            "total": (sent - row.last_received_at).total_seconds(),
        }
    engine.dispose()
    figures["beyond stability"] = figures["total"] - figures["stability wait"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--stable-seconds", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=Path("var/bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="turnaround-", dir=args.workdir.resolve()))
    node_port, dicom, http = free_port(), free_port(), free_port()
    (work / "orthanc.json").write_text(json.dumps({
        "Name": "bench", "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
        "StorageDirectory": str(work / "o-storage"), "IndexDirectory": str(work / "o-index"),
        "DicomModalities": {"AINODE": ["AINODE", "127.0.0.1", node_port]}}))
    db = work / "var" / "ainode.db"
    (work / "ainode.toml").write_text(f"""
[dicom]
ae_title = "AINODE"
host = "127.0.0.1"
port = {node_port}
[storage]
dir = "{work / 'var'}"
min_free_mb = 1
[database]
url = "sqlite:///{db}"
[study]
stable_seconds = {args.stable_seconds}
stable_seconds_by_modality = {{ CR = {args.stable_seconds}, DX = {args.stable_seconds} }}
check_interval_seconds = 0.2
[workers]
count = 1
device = "auto"
poll_seconds = 0.1
[send]
interval_seconds = 0.2
[admin]
port = {free_port()}
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {dicom}
objects = ["SEG", "SR", "HEATMAP"]
[[routes]]
name = "ct"
match = {{ Modality = "CT" }}
models = ["ct-lung"]
destinations = ["pacs"]
[[routes]]
name = "cxr"
match = {{ Modality = ["CR", "DX"] }}
models = ["cxr-pneumonia"]
destinations = ["pacs"]
""")
    log = work / "node.log"
    orthanc = start(["/usr/sbin/Orthanc", str(work / "orthanc.json")], work / "orthanc.log")
    node = start([sys.executable, "-m", "node.cli", "serve", "--config",
                  str(work / "ainode.toml")], log)
    try:
        wait_port(dicom)
        wait_port(node_port)
        while "started on" not in log.read_text():  # the worker has loaded torch
            time.sleep(0.2)
        ct = thin_ct(args.samples / "chest-ct-lung-pet-ct-dx-a0002", work / "ct", args.slices)
        dx = new_study(args.samples / "chest-xray" / "DX_chest_PA_Canon_966_fixed.dcm",
                       work / "dx.dcm")
        print(f"machine: {machine()}; stable_seconds {args.stable_seconds}")
        cases = [(f"CT {len(ct)} slices, ct-lung", ct, [], ("SEG", "SR")),
                 ("DX radiograph, cxr-pneumonia", [dx], ["-xv"], ("SR", "SEG"))]
        for label, files, extra, wanted in cases:
            figures = measure(files, extra, node_port, http, db, log, wanted)
            parts = ", ".join(f"{k} {v:.2f} s" for k, v in figures.items())
            print(f"{label}: {parts}")
    finally:
        stop(node)
        stop(orthanc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
