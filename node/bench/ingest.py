"""Ingest benchmark: the node's durable receiver against Orthanc and dcmtk storescp.

Generates a synthetic 300-slice 512x512 CT (about 160 MB), sends it over loopback
with dcmtk ``storescu`` (``TCP_NODELAY=1``) with 1 and with 4 simultaneous
associations to (a) ``ainode serve`` (file fsync'd, row committed before the
answer), (b) Orthanc, (c) ``storescp --fork``, each storing on a real disk
folder, and prints images/s, MB/s and the node's ratios from the same run.

Run: ``python -m node.bench.ingest`` (``make bench``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ENV = {**os.environ, "TCP_NODELAY": "1"}
ACCEPTORS = os.cpu_count() or 1
"""The node as configured for this machine: one acceptor process per core."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open")


def synthetic_ct(folder: Path, slices: int = 300, size: int = 512) -> list[Path]:
    """A CT series of ``slices`` 16-bit slices with a body-like phantom and noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (size * 0.35)) ** 2 + ((xx - size / 2) / (size * 0.45)) ** 2 < 1
    paths = []
    for i in range(slices):
        pixels = np.where(body, 1024 + 40, 24).astype(np.int32)
        pixels += rng.integers(-20, 20, size=(size, size), dtype=np.int32)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.Modality = "BENCH^SYNTHETIC", "BENCH", "CT"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.ImagePositionPatient = [-160.0, -160.0, float(i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.625, 0.625], 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Target:
    name: str
    start: Callable[[Path, int], subprocess.Popen[bytes]]
    aec: str


def start_node(work: Path, port: int) -> subprocess.Popen[bytes]:
    config = work / "ainode.toml"
    config.write_text(
        f'[dicom]\nae_title = "AINODE"\nhost = "127.0.0.1"\nport = {port}\n'
        f"acceptors = {ACCEPTORS}\n"
        f'[storage]\ndir = "{work / "var"}"\nmin_free_mb = 1\n'
        f'[database]\nurl = "sqlite:///{work / "var" / "ainode.db"}"\n'
        '[workers]\ncount = 0\n[study]\nstable_seconds = 3600\n[logging]\nlevel = "WARNING"\n'
        f'[admin]\nport = {free_port()}\n')
    return subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def start_orthanc(work: Path, port: int) -> subprocess.Popen[bytes]:
    config = work / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "bench", "HttpPort": free_port(), "DicomPort": port, "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
        "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
        "StorageCompression": False}))
    return subprocess.Popen(["/usr/sbin/Orthanc", f"--logfile={work / 'orthanc.log'}",
                             str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV, start_new_session=True)


def start_storescp(work: Path, port: int) -> subprocess.Popen[bytes]:
    out = work / "store"
    out.mkdir()
    return subprocess.Popen(["storescp", "--fork", "-aet", "STORESCP", "-od", str(out),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV, start_new_session=True)


TARGETS = (
    Target("ainode", start_node, "AINODE"),
    Target("orthanc", start_orthanc, "ORTHANC"),
    Target("storescp", start_storescp, "STORESCP"),
)


@contextmanager
def running(target: Target, root: Path) -> Iterator[tuple[int, Path]]:
    work = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=root))
    port = free_port()
    proc = target.start(work, port)
    try:
        wait_port(port)
        time.sleep(0.5)
        yield port, work
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def send(port: int, aec: str, files: list[Path], associations: int) -> float:
    """Send ``files`` split over ``associations`` concurrent storescu runs; return seconds."""
    groups = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", aec, "-aet", "BENCH", "127.0.0.1", str(port),
                               *map(str, group)], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for group in groups]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu to {aec} failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - started


def rows_committed(work: Path, count: int, started: float) -> float:
    """Seconds from the first send until the node's database holds ``count`` instances.

    Every answer already waited for the journal flush; files and rows follow in
    batches. This shows how far behind they are.
    """
    db = work / "var" / "ainode.db"
    while True:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            if conn.execute("SELECT count(*) FROM instances").fetchone()[0] >= count:
                return time.perf_counter() - started
        time.sleep(0.01)


def machine() -> str:
    gpu = "none"
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True)
        gpu = out.stdout.strip() or "none"
    cpu = platform.processor() or platform.machine()
    return (f"{platform.node()}: {os.cpu_count()} cores, {cpu}, GPU {gpu}, "
            f"Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("var/bench"))
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    root = args.workdir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="ct-", dir=root))
    try:
        files = synthetic_ct(data, args.slices)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"machine: {machine()}")
        print(f"study: {len(files)} CT slices 512x512, {mb:.1f} MB, loopback, storescu "
              f"TCP_NODELAY=1, storage on {root}; ainode with dicom.acceptors = {ACCEPTORS}")
        rates: dict[tuple[str, int], float] = {}
        for n in args.associations:
            for target in TARGETS:
                recorded = ""
                with running(target, root) as (port, work):
                    started = time.perf_counter()
                    seconds = send(port, target.aec, files, n)
                    if target.name == "ainode":
                        recorded = (f"; every row committed after "
                                    f"{rows_committed(work, len(files), started):.2f} s")
                rates[(target.name, n)] = len(files) / seconds
                print(f"{target.name:9s} {n} assoc: {len(files) / seconds:7.1f} images/s "
                      f"{mb / seconds:7.1f} MB/s ({seconds:.2f} s to the last answer{recorded})")
        for n in args.associations:
            node = rates[("ainode", n)]
            print(f"ratio {n} assoc: ainode/orthanc {node / rates[('orthanc', n)]:.2f}, "
                  f"ainode/storescp {node / rates[('storescp', n)]:.2f}")
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
