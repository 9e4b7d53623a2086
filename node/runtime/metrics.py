"""Prometheus metrics.

The node runs several processes (the receiver and scheduler, and the workers),
so most metrics are read from the database at scrape time by
:class:`QueueCollector`: they are correct whichever process did the work and
survive restarts. Only association outcomes, which exist nowhere else, are
counted in the receiver process by :data:`ASSOCIATIONS` (a metric definition,
registered into the registry that :func:`make_registry` builds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from db.admin import metric_samples, workers
from db.queue import SessionFactory

ASSOCIATIONS = Counter("ainode_associations", "DICOM associations by outcome (receiver process).",
                       ["outcome"], registry=None)

INFERENCE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
TURNAROUND_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


def histogram(values: Sequence[float], buckets: Iterable[float]
              ) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets (with +Inf) and the sum of ``values``."""
    out = [(_le(bound), float(sum(1 for v in values if v <= bound))) for bound in buckets]
    out.append(("+Inf", float(len(values))))
    return out, float(sum(values))


def _le(bound: float) -> str:
    return str(float(bound))


class QueueCollector(Collector):
    """Metric families read from the queue tables at each scrape."""

    def __init__(self, factory: SessionFactory, clock: Callable[[], datetime]) -> None:
        self.factory = factory
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        samples = metric_samples(self.factory, now)
        yield CounterMetricFamily("ainode_instances_received",
                                  "DICOM instances received and stored.", samples.instances)
        yield CounterMetricFamily("ainode_received_bytes", "Bytes of DICOM instances stored.",
                                  samples.bytes)
        jobs = GaugeMetricFamily("ainode_jobs", "Jobs by state.", labels=["state"])
        for state, count in sorted(samples.jobs_by_status.items()):
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("ainode_oldest_queued_job_age_seconds",
                                "Age of the oldest queued job (0 when none).",
                                samples.oldest_queued_age_seconds)
        wait = HistogramMetricFamily("ainode_queue_wait_seconds",
                                     "From a job queued to its (last) start.")
        wait.add_metric([], *histogram(samples.queue_wait_seconds, WAIT_BUCKETS))
        yield wait
        inference = HistogramMetricFamily("ainode_inference_seconds",
                                          "Model inference time of done jobs.", labels=["model"])
        for model, values in sorted(samples.inference_seconds.items()):
            inference.add_metric([model], *histogram(values, INFERENCE_BUCKETS))
        yield inference
        turnaround = HistogramMetricFamily(
            "ainode_turnaround_seconds",
            "From the last instance of a series received to a result acknowledged by the PACS.")
        turnaround.add_metric([], *histogram(samples.turnaround_seconds, TURNAROUND_BUCKETS))
        yield turnaround
        failures = CounterMetricFamily("ainode_send_failures", "Failed C-STORE attempts.",
                                       labels=["destination"])
        for dest, count in sorted(samples.send_failures.items()):
            failures.add_metric([dest], count)
        yield failures
        alive = sum(1 for w in workers(self.factory, now) if w.alive)
        yield GaugeMetricFamily("ainode_workers_alive", "Worker processes seen alive.", alive)


def make_registry(factory: SessionFactory, clock: Callable[[], datetime]) -> CollectorRegistry:
    """A registry with the database-derived metrics and the receiver's counters."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(factory, clock))
    registry.register(ASSOCIATIONS)
    return registry
