"""The completion sweep: quiet studies become complete and their series are queued as jobs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from functools import partial

from db.queue import SessionFactory, dispatch_stable_studies, first_instance_path
from node.settings import Settings
from node.study.routing import make_planner, stable_seconds_for

log = logging.getLogger("ainode.scheduler")


def complete_studies(settings: Settings, factory: SessionFactory,
                     clock: Callable[[], datetime]) -> list[int]:
    """Mark quiet studies complete and queue one job per (series, model)."""
    planner = make_planner(settings.routes, settings.storage.dir,
                           partial(first_instance_path, factory))
    jobs = dispatch_stable_studies(factory, clock(), stable_seconds_for(settings.study), planner,
                                   settings.workers.max_attempts)
    if jobs:
        log.info("queued job(s) %s", ",".join(map(str, jobs)))
    return jobs
