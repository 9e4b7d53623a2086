"""The completion sweep: quiet studies become complete and their series are queued as jobs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from functools import partial

from db.queue import SessionFactory, dispatch_stable_studies, first_instance_path
from node.settings import Settings
from node.store.ingest import held_studies
from node.study.routing import make_planner, stable_seconds_for

log = logging.getLogger("ainode.scheduler")


def complete_studies(settings: Settings, factory: SessionFactory,
                     clock: Callable[[], datetime],
                     reported: dict[str, str] | None = None) -> list[int]:
    """Mark quiet studies complete and queue one job per (series, model).

    A study with instances received but not yet recorded (an ingest retrying after an
    error) waits. A study whose routes cannot be evaluated (an unreadable file) is
    quarantined with its reason, logged once when it is quarantined (and put in
    ``reported``, study UID -> reason); it is not tried again until an admin retries it
    (dashboard, API or ``ainode studies retry``). The other studies go on.
    """
    planner = make_planner(settings.routes, settings.storage.dir,
                           partial(first_instance_path, factory))
    problems: dict[str, str] = {}
    jobs = dispatch_stable_studies(factory, clock(), stable_seconds_for(settings.study), planner,
                                   settings.workers.max_attempts,
                                   held=held_studies(settings.storage.dir), problems=problems)
    for study_uid, reason in problems.items():  # each one is quarantined by this sweep
        log.error("study %s cannot be routed, quarantined until an admin retries or deletes "
                  "it: %s", study_uid, reason)
        if reported is not None:
            reported[study_uid] = reason
    if jobs:
        log.info("queued job(s) %s", ",".join(map(str, jobs)))
    return jobs
