"""Routing rules: match a series' attributes to models and destinations."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue

from db.queue import JobPlan, SeriesInfo
from node.settings import MatchValue, Route, StudySettings

log = logging.getLogger("ainode.routing")


def _values(ds: Dataset, keyword: str) -> list[str]:
    """The attribute as strings: the whole value, and each item of a multi-valued one."""
    if keyword not in ds:
        return []
    value = ds.data_element(keyword)
    raw = value.value if value is not None else None
    if raw is None:
        return [""]
    if isinstance(raw, MultiValue | list | tuple):
        items = [str(v).strip() for v in raw]
        return ["\\".join(items), *items]
    return [str(raw).strip()]


def value_matches(actual: list[str], expected: MatchValue) -> bool:
    """Exact value, any of a list, or ``re:PATTERN`` (searched) against any actual value."""
    for item in expected if isinstance(expected, list) else [expected]:
        if item.startswith("re:"):
            pattern = re.compile(item[3:])
            if any(pattern.search(v) for v in actual):
                return True
        elif item in actual:
            return True
    return False


def route_matches(route: Route, ds: Dataset) -> bool:
    return all(value_matches(_values(ds, kw), exp) for kw, exp in route.match.items())


def plan_jobs(routes: Sequence[Route], series: SeriesInfo, header: Dataset) -> list[JobPlan]:
    """One job per (series, model); destinations of every matching route are merged."""
    by_model: dict[str, tuple[str, list[str]]] = {}
    for route in routes:
        if not route_matches(route, header):
            continue
        for model in route.models:
            _, dests = by_model.setdefault(model, (route.name, []))
            dests.extend(d for d in route.destinations if d not in dests)
    return [JobPlan(series_id=series.id, model=model, route=name, destinations=tuple(dests))
            for model, (name, dests) in by_model.items()]


def make_planner(routes: Sequence[Route], storage_dir: Path,
                 first_path: Callable[[int], str | None]) -> Callable[[SeriesInfo], list[JobPlan]]:
    """A planner that reads the series' first stored header (no pixel data) and matches routes."""

    def plan(series: SeriesInfo) -> list[JobPlan]:
        rel = first_path(series.id)
        if rel is None:
            return []
        header = dcmread(storage_dir / rel, stop_before_pixels=True)
        plans = plan_jobs(routes, series, header)
        if not plans:
            log.info("series %s (%s) matches no route", series.series_uid, series.modality)
        return plans

    return plan


def stable_seconds_for(study: StudySettings) -> Callable[[Sequence[str]], float]:
    """Quiet period of a study: a modality override applies when it covers every series."""

    def quiet(modalities: Sequence[str]) -> float:
        overrides = study.stable_seconds_by_modality
        if modalities and all(m in overrides for m in modalities):
            return max(overrides[m] for m in modalities)
        return study.stable_seconds

    return quiet
