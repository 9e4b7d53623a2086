"""CUDA out of memory: the job runs on a CPU instance of the model, whose weights load once."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from models.base import InputSpec, Model, Prediction, Volume
from node.infer.worker import Worker
from node.runtime.clock import utcnow
from node.settings import Settings

VOLUME = Volume(np.zeros((1, 2, 2), np.float32), (1.0, 1.0, 1.0), "CT")


class Weights:
    """Counts the weights loads per device, and how many predictions still run out of memory."""

    def __init__(self, ooms: int) -> None:
        self.loads: Counter[str] = Counter()
        self.ooms = ooms
        self.predicts: Counter[str] = Counter()


class SmallModel(Model):
    """A fake model: every instance shares one :class:`Weights` counter."""

    name = "small"
    version = "1"
    intended_use = "test"
    input_spec = InputSpec(modalities=("CT",))

    def __init__(self, weights: Weights) -> None:
        self.weights = weights
        self.device = ""

    def load(self, device: str) -> None:
        self.device = device
        self.weights.loads[device] += 1

    def predict(self, volume: Volume) -> Prediction:
        if self.device.startswith("cuda") and self.weights.ooms > 0:
            self.weights.ooms -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        self.weights.predicts[self.device] += 1
        return Prediction()


def worker(weights: Weights, factory: sessionmaker[Session], device: str = "cuda") -> Worker:
    """A worker on ``device`` whose registry makes a new :class:`SmallModel` per call."""
    return Worker(settings=Settings(), factory=factory,
                  registry={"small": lambda: SmallModel(weights)}, clock=utcnow, device=device)


def test_out_of_memory_loads_the_weights_once_for_the_cpu(
        factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture) -> None:
    weights = Weights(ooms=1)
    w = worker(weights, factory)
    model = w.model("small")
    with caplog.at_level(logging.WARNING, logger="ainode.worker"):
        w._predict(model, VOLUME, 7)
    assert weights.loads == {"cuda": 1, "cpu": 1}
    assert weights.predicts == {"cpu": 1}
    assert isinstance(model, SmallModel) and model.device == "cuda"  # still on the GPU
    assert any("job 7" in r.getMessage() and "out of memory" in r.getMessage()
               for r in caplog.records)
    w._predict(model, VOLUME, 8)  # fits again: runs on the GPU, nothing reloads
    assert weights.loads == {"cuda": 1, "cpu": 1}
    assert weights.predicts == {"cpu": 1, "cuda": 1}


def test_later_out_of_memory_jobs_reuse_the_cpu_instance(
        factory: sessionmaker[Session]) -> None:
    weights = Weights(ooms=3)
    w = worker(weights, factory)
    model = w.model("small")
    for job_id in (1, 2, 3):
        w._predict(model, VOLUME, job_id)
    assert weights.loads == {"cuda": 1, "cpu": 1}
    assert weights.predicts == {"cpu": 3}


def test_out_of_memory_on_the_cpu_is_not_caught(factory: sessionmaker[Session]) -> None:
    weights = Weights(ooms=1)
    w = worker(weights, factory, device="cpu")
    model = w.model("small")
    assert isinstance(model, SmallModel)
    model.device = "cuda"  # predicts as if on a GPU while the worker thinks it is on the CPU
    with pytest.raises(torch.cuda.OutOfMemoryError):
        w._predict(model, VOLUME, 1)
    assert weights.loads == {"cpu": 1}
