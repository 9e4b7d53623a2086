"""The wheel ships the service only: no benchmarks, no training code, but its data files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_holds_the_service_without_benchmarks_or_training(tmp_path: Path) -> None:
    # Built from a copy of the source files, so no build/ folder of an earlier build is reused.
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "src"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "--quiet", "-w", str(tmp_path), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("ainode-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [n for n in names if n.startswith(("node/bench/", "models/training/"))]
    for needed in ("node/receive/server.py", "node/default_config.toml", "node/cli/__main__.py",
                   "models/weights/cxr_pneumonia.safetensors", "db/migrations/env.py"):
        assert needed in names, needed
