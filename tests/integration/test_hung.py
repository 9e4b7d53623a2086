"""A hung inference is stopped by the job time limit: requeued, then failed, worker restarted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.schema import Job, JobStatus
from tests.peers import CHEST_CT, ROOT, stage_series

HANGING_MODEL = """
import time
from models.base import InputSpec, Model, Prediction

class Hangs(Model):
    name = "hangs"
    version = "1"
    intended_use = "test: never returns"
    input_spec = InputSpec(modalities=("CT",))

    def load(self, device):
        pass

    def predict(self, volume):
        time.sleep(600)
        return Prediction()
"""


def test_hung_job_hits_the_time_limit(tmp_path: Path, db_url: str,
                                      factory: sessionmaker[Session]) -> None:
    site = tmp_path / "site"
    (site / "hangs_model-1.0.dist-info").mkdir(parents=True)
    (site / "hangs_model.py").write_text(HANGING_MODEL)
    (site / "hangs_model-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: hangs-model\nVersion: 1.0\n")
    (site / "hangs_model-1.0.dist-info" / "entry_points.txt").write_text(
        "[ainode.models]\nhangs = hangs_model:Hangs\n")
    store = tmp_path / "var"
    stage_series(factory, store, sorted(CHEST_CT.glob("*.dcm"))[:3], "hangs", max_attempts=2)
    config = tmp_path / "ainode.toml"
    config.write_text(f'[storage]\ndir = "{store}"\n[database]\nurl = "{db_url}"\n'
                      "[workers]\njob_timeout_seconds = 3\nheartbeat_seconds = 0.5\n"
                      'lease_seconds = 30\npoll_seconds = 0.2\ndevice = "cpu"\n')
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}

    def run_worker() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "node.cli", "worker", "--config",
                               str(config)], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)

    def job() -> Job:
        with factory() as s:
            return s.scalars(select(Job)).one()

    first = run_worker()
    assert first.returncode == 3, first.stderr
    assert "time limit" in first.stderr
    assert job().status is JobStatus.QUEUED and "time limit" in (job().last_error or "")
    with factory.begin() as s:  # skip the retry delay
        s.scalars(select(Job)).one().not_before = None
    second = run_worker()
    assert second.returncode == 3
    final = job()
    assert final.status is JobStatus.FAILED and final.attempts == 2
