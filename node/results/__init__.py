"""DICOM result objects built with highdicom: a BINARY SEG and a TID 1500 Comprehensive 3D SR."""

from node.results.common import ResultContext, ResultKind, result_uids, series_description
from node.results.seg import build_seg
from node.results.sr import build_sr

__all__ = [
    "ResultContext",
    "ResultKind",
    "build_seg",
    "build_sr",
    "result_uids",
    "series_description",
]
