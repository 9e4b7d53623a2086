"""DICOM result objects built with highdicom (BINARY and heatmap SEG, TID 1500 SR, secondary
captures), and which of them each destination gets (:mod:`node.results.selection`)."""

from node.results.common import ResultContext, ResultKind, result_uids, series_description
from node.results.seg import build_seg
from node.results.selection import (
    DEFAULT_KINDS,
    ResultObject,
    build_results,
    destination_kinds,
    kinds_by_destination,
    wanted_kinds,
)
from node.results.sr import build_sr

__all__ = [
    "DEFAULT_KINDS",
    "ResultContext",
    "ResultKind",
    "ResultObject",
    "build_results",
    "build_seg",
    "build_sr",
    "destination_kinds",
    "kinds_by_destination",
    "result_uids",
    "series_description",
    "wanted_kinds",
]
