"""Which result objects each destination gets, and building exactly the objects wanted.

The one place that decides it:

* a destination takes the kinds of its ``objects`` setting;
* an SR brings its SEG along: the SR's measurement groups reference the SEG;
* a destination no longer in the settings, and a job without destinations, get
  :data:`DEFAULT_KINDS` (SEG and SR).

The worker builds the union of what its job's destinations take
(:func:`wanted_kinds`, :func:`build_results`); the outbox gives each destination
its own kinds (``db.queue.complete_job``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from models.base import Prediction, Volume
from node.results.common import ResultContext, ResultKind
from node.results.heatmap import build_heatmap_seg
from node.results.sc import build_sc
from node.results.seg import build_seg
from node.results.sr import build_sr
from node.settings import Settings

#: What a job without destinations, or a destination missing from the settings, gets.
DEFAULT_KINDS: frozenset[ResultKind] = frozenset({ResultKind.SEG, ResultKind.SR})

#: Kinds that cannot go without another: an SR references its SEG.
REQUIRES: Mapping[ResultKind, frozenset[ResultKind]] = {
    ResultKind.SR: frozenset({ResultKind.SEG}),
}


@dataclass(frozen=True)
class ResultObject:
    """One built DICOM object and its kind."""

    kind: ResultKind
    dataset: Dataset


def with_requirements(kinds: Collection[ResultKind]) -> frozenset[ResultKind]:
    """``kinds`` and the kinds they require (an SR's SEG)."""
    out = {ResultKind(kind) for kind in kinds}
    for kind in list(out):
        out |= REQUIRES.get(kind, frozenset())
    return frozenset(out)


def destination_kinds(settings: Settings, name: str) -> frozenset[ResultKind]:
    """The kinds destination ``name`` takes (:data:`DEFAULT_KINDS` if it is not configured)."""
    try:
        objects: Collection[ResultKind] = settings.destination(name).objects
    except KeyError:
        objects = DEFAULT_KINDS
    return with_requirements(objects)


def kinds_by_destination(settings: Settings, destinations: Sequence[str]
                         ) -> dict[str, frozenset[ResultKind]]:
    """The kinds each of a job's ``destinations`` takes."""
    return {name: destination_kinds(settings, name) for name in destinations}


def wanted_kinds(kinds: Mapping[str, Collection[ResultKind]]) -> frozenset[ResultKind]:
    """The kinds to build: every kind some destination takes; SEG and SR without destinations."""
    if not kinds:
        return DEFAULT_KINDS
    return with_requirements(frozenset().union(*kinds.values()))


def reportable(prediction: Prediction) -> bool:
    """Whether ``prediction`` has anything an SR reports."""
    return bool(prediction.segments or prediction.measurements or prediction.findings)


def build_results(sources: Sequence[Dataset], volume: Volume, prediction: Prediction,
                  ctx: ResultContext, wanted: Collection[ResultKind]) -> list[ResultObject]:
    """Build the objects of the ``wanted`` kinds (and those they require) that ``prediction`` gives.

    In this order: the SEG (when there are segments), the SR (segments,
    measurements or findings), the heatmap SEG (heatmaps), the secondary captures.
    """
    kinds = with_requirements(wanted)
    objects: list[ResultObject] = []
    seg = build_seg(sources, prediction, ctx) if ResultKind.SEG in kinds else None
    if seg is not None:
        objects.append(ResultObject(ResultKind.SEG, seg))
    if ResultKind.SR in kinds and reportable(prediction):
        objects.append(ResultObject(ResultKind.SR, build_sr(sources, prediction, ctx, seg)))
    if ResultKind.HEATMAP in kinds and prediction.heatmaps:
        heatmap = build_heatmap_seg(sources, prediction, ctx)
        if heatmap is not None:
            objects.append(ResultObject(ResultKind.HEATMAP, heatmap))
    if ResultKind.SC in kinds:
        objects += [ResultObject(ResultKind.SC, ds)
                    for ds in build_sc(sources, volume, prediction, ctx)]
    return objects
