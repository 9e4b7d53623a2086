"""Periodic work, driven by apscheduler: study completion, lease sweep, sending, retention."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler

from db.admin import forget_stale_workers
from db.queue import SessionFactory, requeue_expired
from db.retention import PurgeReport, purge_expired
from node.send.breaker import CircuitBreaker
from node.send.sender import send_due
from node.settings import Settings
from node.study.completion import complete_studies

log = logging.getLogger("ainode.scheduler")


def sweep_leases(factory: SessionFactory, clock: Callable[[], datetime]) -> list[int]:
    requeued = requeue_expired(factory, clock())
    if requeued:
        log.warning("lease expired for job(s) %s: requeued or failed", ",".join(map(str, requeued)))
    return requeued


def purge_studies(settings: Settings, factory: SessionFactory,
                  clock: Callable[[], datetime]) -> PurgeReport:
    """Delete finished, delivered studies older than ``storage.retention_days``."""
    report = purge_expired(factory, settings.storage.dir, clock(),
                           settings.storage.retention_days)
    if report.purged or report.kept:
        log.info("retention: purged %d study(ies), kept %d still in work or undelivered",
                 len(report.purged), report.kept)
    return report


def make_scheduler(settings: Settings, factory: SessionFactory,
                   clock: Callable[[], datetime]) -> BackgroundScheduler:
    """A scheduler with the node's periodic jobs (not started)."""
    scheduler = BackgroundScheduler(timezone="UTC", job_defaults={
        "coalesce": True, "max_instances": 1, "misfire_grace_time": None})
    scheduler.add_job(complete_studies, "interval", args=[settings, factory, clock, {}],
                      seconds=settings.study.check_interval_seconds, id="complete-studies")
    scheduler.add_job(sweep_leases, "interval", args=[factory, clock],
                      seconds=max(1.0, min(10.0, settings.workers.lease_seconds / 4)),
                      id="sweep-leases")
    breaker = CircuitBreaker(settings.send.breaker_failures, settings.send.breaker_open_seconds,
                             max_open_seconds=settings.send.backoff_max_seconds)
    scheduler.add_job(send_due, "interval", args=[settings, factory, clock],
                      kwargs={"breaker": breaker},
                      seconds=settings.send.interval_seconds, id="send-results")
    scheduler.add_job(lambda: forget_stale_workers(factory, clock()), "interval", hours=1,
                      id="forget-stale-workers")
    if settings.storage.retention_days > 0:
        scheduler.add_job(purge_studies, "interval", args=[settings, factory, clock], hours=1,
                          id="purge-expired-studies")
    return scheduler
