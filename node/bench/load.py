"""Load and memory benchmark: many simultaneous associations, 10,000 instances.

Starts ``ainode serve`` (no workers, so only the receiver is measured), then
``--associations`` storescu processes push their own studies at the same time
(``TCP_NODELAY=1``). Prints instances/s, failed stores, the instances recorded
in the database, and the receiver's peak resident memory (VmHWM), sampled
through the run.

Run: ``python -m node.bench.load`` (``make bench``).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from node.bench.ingest import ENV, free_port, machine, synthetic_ct, wait_port


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of ``pid`` in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=16)
    parser.add_argument("--studies", type=int, default=5, help="studies per association")
    parser.add_argument("--instances", type=int, default=10_000, help="instances in all")
    parser.add_argument("--size", type=int, default=128, help="rows and columns per image")
    parser.add_argument("--workdir", type=Path, default=Path("var/bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="load-", dir=args.workdir.resolve()))
    per_study = max(1, args.instances // (args.associations * args.studies))
    groups: list[list[Path]] = []
    for a in range(args.associations):
        files: list[Path] = []
        for s in range(args.studies):
            files += synthetic_ct(work / "data" / f"a{a}" / f"s{s}", per_study, args.size)
        groups.append(files)
    total = sum(len(g) for g in groups)
    port = free_port()
    config = work / "ainode.toml"
    config.write_text(
        f'[dicom]\nae_title = "AINODE"\nhost = "127.0.0.1"\nport = {port}\n'
        f'max_associations = {args.associations + 4}\n'
        f'[storage]\ndir = "{work / "var"}"\nmin_free_mb = 1\n'
        f'[database]\nurl = "sqlite:///{work / "var" / "ainode.db"}"\n'
        '[workers]\ncount = 0\n[study]\nstable_seconds = 3600\n[logging]\nlevel = "WARNING"\n'
        f'[admin]\nport = {free_port()}\n')
    node = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], rss_mb(node.pid)[0])

    try:
        wait_port(port)
        time.sleep(0.5)
        start_rss = rss_mb(node.pid)[0]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        procs = [subprocess.Popen(["storescu", "-aec", "AINODE", "-aet", f"LOAD{i}", "-nh",
                                   "127.0.0.1", str(port), *map(str, g)], env=ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for i, g in enumerate(groups)]
        failures = 0
        for proc in procs:
            _, err = proc.communicate()
            failures += err.decode(errors="replace").count("Store Failed")
            failures += int(proc.returncode != 0)
        seconds = time.perf_counter() - started
        time.sleep(1.0)  # the writer thread commits the last batch
        done.set()
        with sqlite3.connect(work / "var" / "ainode.db") as db:
            recorded = db.execute("select count(*) from instances").fetchone()[0]
        _, hwm = rss_mb(node.pid)
        print(f"machine: {machine()}")
        print(f"load: {args.associations} simultaneous associations, {total} instances "
              f"({args.size}x{args.size}, {args.studies} studies each): "
              f"{total / seconds:.1f} instances/s ({seconds:.1f} s), failed stores {failures}, "
              f"recorded {recorded}")
        print(f"receiver memory: {start_rss:.0f} MiB at start, peak {max(peak[0], hwm):.0f} MiB "
              f"(VmHWM {hwm:.0f} MiB)")
    finally:
        done.set()
        node.terminate()
        node.wait(60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
