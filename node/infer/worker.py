"""The inference worker: claims jobs, runs models, writes results into the outbox.

Runs as its own process (``ainode worker``). Each model is loaded once per
worker. A claimed job holds a lease that a heartbeat thread extends; if the
worker dies the lease expires and the scheduler queues the job again. Results
get UIDs derived from the job's seed, so a re-run produces the same objects.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO

import node
from db.admin import report_presence
from db.queue import (
    JobRecord,
    ResultSpec,
    SessionFactory,
    claim_job,
    complete_job,
    fail_job,
    heartbeat,
    series_instance_paths,
    skip_job,
)
from models.base import Model, ModelError, Prediction, UnsupportedInput, Volume
from models.registry import ModelFactory, UnknownModel, create
from node.infer.volume import build_volume
from node.results import (
    ResultContext,
    ResultKind,
    ResultObject,
    build_results,
    kinds_by_destination,
    wanted_kinds,
)
from node.runtime.faults import crash_point
from node.settings import Settings
from node.store.files import result_path, write_file

log = logging.getLogger("ainode.worker")


def resolve_device(requested: str) -> str:
    """Map ``auto`` to ``cuda`` when a GPU is usable, else ``cpu``; check explicit CUDA requests."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        log.info("no CUDA device available: running models on the CPU")
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: falling back to the CPU",
                    requested)
        return "cpu"
    return requested


def encode(ds: Dataset) -> bytes:
    """A DICOM file (preamble, file meta, dataset) as bytes."""
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class Worker:
    settings: Settings
    factory: SessionFactory
    registry: dict[str, ModelFactory]
    clock: Callable[[], datetime]
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    device: str = "cpu"
    _models: dict[str, Model] = field(default_factory=dict)
    _cpu_models: dict[str, Model] = field(default_factory=dict)
    """CPU instances of models that ran out of CUDA memory, kept for the next such job."""

    def model(self, name: str) -> Model:
        """The loaded model, loading it on first use."""
        if name not in self._models:
            self._models[name] = self._load(name, self.device)
        return self._models[name]

    def cpu_model(self, name: str) -> Model:
        """A CPU instance of model ``name`` for jobs that do not fit in GPU memory.

        Its weights load on the first such job; later ones reuse it. A factory that
        hands out one shared instance gives back the worker's own model (moved to
        the CPU); :meth:`_predict_on_cpu` then moves it back.
        """
        if name not in self._cpu_models:
            model = self._load(name, "cpu")
            if model is self._models.get(name):
                return model
            self._cpu_models[name] = model
        return self._cpu_models[name]

    def _load(self, name: str, device: str) -> Model:
        model = create(name, self.registry)
        started = time.monotonic()
        model.load(device)
        log.info("loaded model %s %s on %s in %.1f s", name, model.algorithm_version,
                 device, time.monotonic() - started)
        return model

    def run(self, stop: threading.Event) -> None:
        """Claim and process jobs until ``stop`` is set; the job in hand is finished first."""
        log.info("worker %s started on %s", self.owner, self.device)
        while not stop.is_set():
            report_presence(self.factory, self.owner, os.getpid(), self.device, self.clock())
            job = claim_job(self.factory, self.owner, self.clock(),
                            self.settings.workers.lease_seconds)
            if job is None:
                stop.wait(self.settings.workers.poll_seconds)
                continue
            self.process(job)
        log.info("worker %s stopped", self.owner)

    def process(self, job: JobRecord) -> None:
        """Run one claimed job to an outcome: done, skipped, requeued or failed."""
        log.info("job %d: %s on series %s (attempt %d/%d)", job.id, job.model, job.series_uid,
                 job.attempts, job.max_attempts)
        beating = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job, beating), daemon=True)
        beat.start()
        kinds = kinds_by_destination(self.settings, job.destinations)
        try:
            results, seconds = self._execute(job, wanted_kinds(kinds))
        except UnsupportedInput as exc:
            log.info("job %d skipped: %s", job.id, exc)
            skip_job(self.factory, job.id, self.owner, self.clock(), str(exc))
            return
        except (ModelError, UnknownModel) as exc:
            reason = f"unknown model {exc}" if isinstance(exc, UnknownModel) else str(exc)
            log.error("job %d failed: %s", job.id, reason)
            fail_job(self.factory, job.id, self.owner, self.clock(), reason, retry=False)
            return
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            status = fail_job(self.factory, job.id, self.owner, self.clock(), reason, retry=True)
            log.exception("job %d error (now %s)", job.id, status.value if status else "not ours")
            return
        finally:
            beating.set()
            beat.join()
        if complete_job(self.factory, job.id, self.owner, self.clock(), results, seconds,
                        kinds):
            log.info("job %d done in %.2f s inference: %d object(s) for %s", job.id, seconds,
                     len(results), ",".join(job.destinations) or "no destination")
        else:
            log.warning("job %d: lease lost before completion; its new run will deliver", job.id)

    def _heartbeat(self, job: JobRecord, done: threading.Event) -> None:
        """Extend the lease until ``done``; stop when the job is no longer ours.

        A job past ``workers.job_timeout_seconds`` is hung (a model cannot be
        interrupted from another thread): it is requeued or failed with the reason,
        and this worker process exits so that a fresh one takes over.
        """
        interval = self.settings.workers.heartbeat_seconds
        limit = self.settings.workers.job_timeout_seconds
        started = time.monotonic()
        while not done.wait(min(interval, limit)):
            if time.monotonic() - started > limit and not done.is_set():
                reason = f"job exceeded the time limit of {limit:g} s (hung inference?)"
                status = fail_job(self.factory, job.id, self.owner, self.clock(), reason,
                                  retry=True)
                log.error("job %d: %s; now %s; restarting the worker", job.id, reason,
                          status.value if status else "not ours")
                os._exit(3)
            if not heartbeat(self.factory, job.id, self.owner, self.clock(),
                             self.settings.workers.lease_seconds):
                log.warning("job %d: lease lost while running", job.id)
                return

    def _predict(self, model: Model, volume: Volume, job_id: int) -> Prediction:
        """Predict on the worker's device; on CUDA out of memory, this job runs on the CPU.

        The model stays loaded on the device for the next jobs; the job runs on a
        CPU instance of the model (:meth:`cpu_model`), whose weights load once.
        """
        import torch

        try:
            return model.predict(volume)
        except torch.cuda.OutOfMemoryError:
            if self.device == "cpu":
                raise
            log.warning("job %d: CUDA out of memory on %s: running this job on the CPU",
                        job_id, self.device)
            torch.cuda.empty_cache()
            return self._predict_on_cpu(model, volume)

    def _predict_on_cpu(self, model: Model, volume: Volume) -> Prediction:
        name = next((key for key, loaded in self._models.items() if loaded is model),
                    model.name)
        cpu = self.cpu_model(name)
        if cpu is not model:
            return cpu.predict(volume)
        try:  # one shared instance: it was moved to the CPU, and goes back afterwards
            return model.predict(volume)
        finally:
            model.load(self.device)

    def _execute(self, job: JobRecord, wanted: frozenset[ResultKind]
                 ) -> tuple[list[ResultSpec], float]:
        model = self.model(job.model)
        root = self.settings.storage.dir
        loading = time.monotonic()
        paths = series_instance_paths(self.factory, job.series_id)
        datasets = [dcmread(root / p) for p in paths]
        series = build_volume(datasets)
        model.check_input(series.volume)
        started = time.monotonic()
        prediction = self._predict(model, series.volume, job.id)
        seconds = time.monotonic() - started
        crash_point("worker.predicted")
        ctx = ResultContext(
            model_name=model.name, model_version=model.version,
            algorithm_version=model.algorithm_version, software_version=node.__version__,
            uid_seed=job.uid_seed,
        )
        objects = build_results(series.sources, series.volume, prediction, ctx, wanted)
        specs = [self._write(job.id, obj) for obj in objects]
        crash_point("worker.written")
        log.info("job %d timings: load %.3f s, inference %.3f s, encode %.3f s (%d images)",
                 job.id, started - loading, seconds, time.monotonic() - started - seconds,
                 len(datasets))
        return specs, seconds

    def _write(self, job_id: int, obj: ResultObject) -> ResultSpec:
        """Write one result object durably under the storage folder; its outbox entry."""
        ds = obj.dataset
        rel = result_path(job_id, obj.kind, str(ds.SOPInstanceUID))
        write_file(self.settings.storage.dir, rel, encode(ds))
        return ResultSpec(kind=obj.kind, sop_class_uid=str(ds.SOPClassUID),
                          sop_instance_uid=str(ds.SOPInstanceUID), path=str(rel))
