"""Bring-your-own models (TorchScript, MONAI bundle), plug-in discovery, CUDA fallback.

The TorchScript files and the bundle folder are made by the tests themselves.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.queue import (
    claim_job,
    due_results,
)
from db.schema import Job, JobStatus
from models.base import (
    WEIGHTS_HASH_DIGITS,
    Model,
    ModelError,
    Prediction,
    UnsupportedInput,
    Volume,
    sha256_file,
)
from models.registry import UnknownModel, create
from models.torchscript import TorchScriptModel
from node.admin.catalog import catalog
from node.infer.plugins import available_models
from node.infer.radiograph import radiograph_to_volume
from node.infer.volume import build_volume
from node.infer.worker import Worker
from node.runtime.clock import utcnow
from node.settings import Settings, parse_settings
from tests.peers import CHEST_CT, ROOT, SAMPLES, dciodvfy, stage_series

NIH = SAMPLES / "chest-xray" / "NIH_CXR14_SC_Covid0000.dcm"


class MeanClassifier(torch.nn.Module):
    """Two logits from the mean intensity: 'bright' images score high."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = (x.mean(dim=(1, 2, 3)) - 0.5) * 10.0
        return torch.stack([-k, k], dim=1)


class ThresholdSegmenter(torch.nn.Module):
    """Label 1 where the (windowed) input is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1)


def script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def settings_with(models_toml: str, tmp_path: Path) -> Settings:
    return parse_settings(f'[storage]\ndir = "{tmp_path / "var"}"\n' + models_toml)


CLASSIFIER = """
[[models]]
name = "site-cxr"
path = "{path}"
version = "2.1"
task = "classification"
modalities = ["DX", "CR"]
input_size = [64, 64]
activation = "softmax"
[[models.classes]]
index = 1
threshold = 0.5
code = {{ value = "233604007", scheme = "SCT", meaning = "Pneumonia" }}
"""

SEGMENTER = """
[[models]]
name = "site-body"
kind = "{kind}"
path = "{path}"
{version}
task = "segmentation"
modalities = ["CT"]
dims = {dims}
{size}
window = [-500.0, 1000.0]
min_slices = 10
[[models.labels]]
value = 1
label = "Body"
category = {{ value = "91723000", scheme = "SCT", meaning = "Anatomical Structure" }}
type = {{ value = "38266002", scheme = "SCT", meaning = "Entire body" }}
"""


@pytest.fixture(scope="module")
def ct() -> tuple[list[pydicom.Dataset], Volume]:
    datasets = [pydicom.dcmread(p) for p in sorted(CHEST_CT.glob("*.dcm"))]
    series = build_volume(datasets)
    return list(series.sources), series.volume


def test_torchscript_classifier_from_config(tmp_path: Path) -> None:
    weights = script(MeanClassifier(), tmp_path / "cxr.ts")
    settings = settings_with(CLASSIFIER.format(path=weights), tmp_path)
    model = available_models(settings)["site-cxr"]()
    model.load("cpu")
    volume = radiograph_to_volume(pydicom.dcmread(NIH))
    (finding,) = model.predict(volume).findings
    k = (float(volume.array.mean()) - 0.5) * 10
    expected = 1 / (1 + np.exp(-2 * k))  # softmax of [-k, k]
    assert finding.name.value == "233604007"
    assert finding.probability == pytest.approx(expected, abs=0.02)
    assert finding.present == (finding.probability >= 0.5)
    assert model.weights_sha256 == sha256_file(weights)
    assert model.algorithm_version == f"2.1+sha256:{sha256_file(weights)[:16]}"


def test_catalog_shows_the_weights_hash_of_a_configured_model(tmp_path: Path) -> None:
    weights = script(MeanClassifier(), tmp_path / "cxr.ts")
    settings = settings_with(CLASSIFIER.format(path=weights), tmp_path)
    found = {m.name: m for m in catalog(lambda: available_models(settings))()}
    digest = sha256_file(weights)
    assert found["site-cxr"].weights_sha256 == digest
    assert found["site-cxr"].algorithm_version == f"2.1+sha256:{digest[:WEIGHTS_HASH_DIGITS]}"
    assert found["ct-lung"].weights_sha256 is None  # a model without weights


def test_weights_hash_changes_with_the_file(tmp_path: Path) -> None:
    one = script(MeanClassifier(), tmp_path / "a.ts")
    two = script(ThresholdSegmenter(), tmp_path / "b.ts")
    versions = {available_models(settings_with(CLASSIFIER.format(path=p), tmp_path))
                ["site-cxr"]().algorithm_version for p in (one, two)}
    assert len(versions) == 2


@pytest.mark.parametrize(("dims", "size"), [(2, None), (3, [16, 128, 128])])
def test_torchscript_segmentation(tmp_path: Path, ct: tuple[list[pydicom.Dataset], Volume],
                                  dims: int, size: list[int] | None) -> None:
    weights = script(ThresholdSegmenter(), tmp_path / "seg.ts")
    toml = SEGMENTER.format(kind="torchscript", path=weights, version='version = "1.0"',
                            dims=dims, size=f"input_size = {size}" if size else "")
    model = available_models(settings_with(toml, tmp_path))["site-body"]()
    model.load("cpu")
    _, volume = ct
    (segment,) = model.predict(volume).segments
    expected = volume.array > -500
    assert segment.mask.shape == volume.array.shape
    iou = (segment.mask & expected).sum() / (segment.mask | expected).sum()
    assert iou > (0.999 if size is None else 0.85)
    with pytest.raises(UnsupportedInput):
        model.predict(Volume(volume.array[:5], volume.spacing, "CT"))


def test_monai_bundle_folder(tmp_path: Path, ct: tuple[list[pydicom.Dataset], Volume]) -> None:
    bundle = tmp_path / "body_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({
        "name": "Body bundle", "version": "0.3.1",
        "network_data_format": {
            "inputs": {"image": {"num_channels": 1, "spatial_shape": [256, 256]}},
            "outputs": {"pred": {"num_channels": 2}}},
    }))
    script(ThresholdSegmenter(), bundle / "models" / "model.ts")
    toml = SEGMENTER.format(kind="monai-bundle", path=bundle, version="", dims=2, size="")
    model = available_models(settings_with(toml, tmp_path))["site-body"]()
    assert model.version == "0.3.1"
    assert isinstance(model, TorchScriptModel) and model.spec.input_size == (256, 256)
    model.load("cpu")
    _, volume = ct
    (segment,) = model.predict(volume).segments
    body = volume.array > -500
    assert (segment.mask & body).sum() / (segment.mask | body).sum() > 0.95


def test_bad_model_config_names_the_key(tmp_path: Path) -> None:
    from node.errors import ConfigError

    with pytest.raises(ConfigError, match=r"models\.0"):
        settings_with('[[models]]\nname = "x"\npath = "x.ts"\ntask = "classification"\n'
                      'modalities = ["CR"]\nversion = "1"\n', tmp_path)


def test_worker_runs_a_configured_model_to_valid_seg_and_sr(
        tmp_path: Path, factory: sessionmaker[Session]) -> None:
    weights = script(ThresholdSegmenter(), tmp_path / "seg.ts")
    toml = SEGMENTER.format(kind="torchscript", path=weights, version='version = "1.0"',
                            dims=2, size="")
    toml = ('[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
            'port = 104\n' + toml)
    settings = settings_with(toml, tmp_path)
    store = settings.storage.dir
    stage_series(factory, store, sorted(CHEST_CT.glob("*.dcm")), "site-body", ("pacs",))
    worker = Worker(settings=settings, factory=factory, registry=available_models(settings),
                    clock=utcnow)
    job = claim_job(factory, worker.owner, utcnow(), 60)
    assert job is not None
    worker.process(job)
    with factory() as s:
        row = s.scalars(select(Job)).one()
        assert row.status is JobStatus.DONE, row.last_error
    results = due_results(factory, utcnow())
    kinds = sorted(r.kind for r in results)
    assert kinds == ["SEG", "SR"]
    sha = sha256_file(weights)[:16]
    for result in results:
        path = store / result.path
        errors, _ = dciodvfy(path)
        assert errors == [], errors
        ds = pydicom.dcmread(path)
        if result.kind == "SEG":
            algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
            assert algorithm.AlgorithmVersion.endswith(sha)


class OomOnGpu(Model):
    """Stands in for a GPU that runs out of memory (no GPU exists in CI)."""

    name = "oom"
    version = "1"
    intended_use = "test"
    from models.base import InputSpec as _Spec

    input_spec = _Spec(modalities=("CT",))

    def __init__(self) -> None:
        self.device = ""
        self.loads: list[str] = []

    def load(self, device: str) -> None:
        self.device = device
        self.loads.append(device)

    def predict(self, volume: Volume) -> Prediction:
        if self.device.startswith("cuda"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return Prediction()


def test_cuda_out_of_memory_falls_back_to_cpu(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              factory: sessionmaker[Session]) -> None:
    model = OomOnGpu()
    worker = Worker(settings=Settings(), factory=factory, registry={"oom": lambda: model},
                    clock=utcnow, device="cuda")
    loaded = worker.model("oom")
    with caplog.at_level(logging.WARNING, logger="ainode.worker"):
        worker._predict(loaded, Volume(np.zeros((1, 2, 2), np.float32), (1, 1, 1), "CT"), 7)
    assert model.loads == ["cuda", "cpu", "cuda"]
    assert any("out of memory" in r.getMessage() and "CPU" in r.getMessage()
               for r in caplog.records)


def test_unknown_model_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"^'nope'$") as raised:
        create("nope", {})
    assert isinstance(raised.value, UnknownModel) and raised.value.name == "nope"


def test_third_party_model_is_discovered_by_entry_point(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "acme_model-1.0.dist-info").mkdir(parents=True)
    (site / "acme_model.py").write_text(
        "from models.base import InputSpec, Model, Prediction\n"
        "class Acme(Model):\n"
        "    name = 'acme'\n    version = '4.2'\n    intended_use = 'demo'\n"
        "    input_spec = InputSpec(modalities=('MR',))\n"
        "    def load(self, device): pass\n"
        "    def predict(self, volume): return Prediction()\n")
    (site / "acme_model-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: acme-model\nVersion: 1.0\n")
    (site / "acme_model-1.0.dist-info" / "entry_points.txt").write_text(
        "[ainode.models]\nacme = acme_model:Acme\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-m", "node.cli", "models", "list", "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows["acme"]["version"] == "4.2" and "MR" in rows["acme"]["accepts"]
    assert {"ct-lung", "cxr-pneumonia"} <= set(rows)
