"""Build a TID 1500 Measurement Report (Comprehensive 3D SR) from a model's prediction.

Content tree (PS3.16 TID 1500)::

    Imaging Measurement Report (126000, DCM)
      Language (en-US), observation context: device observer = the algorithm
      Procedure Reported (from modality and body part, or ResultContext.procedure)
      Image Library (TID 1600): every source instance, when they are listed (below)
        and their headers allow
      Imaging Measurements (126010, DCM)
        per segment: Measurement Group, TID 1411 (volumetric ROI)
          tracking identifier + UID (the same as in the SEG), finding category and
          finding type (segment codes), finding site with laterality (anatomic
          segments), the SEG segment referenced with its source images (listed) or
          its source series, algorithm identification, the segment's measurements
          (TID 300, UCUM units, derivation where given)
        per-study measurements: one Measurement Group, TID 1501, with source images
          (listed)
        per finding: one Measurement Group, TID 1501, with source images (listed):
          qualitative evaluation (finding code = Present/Absent, SCT 52101004/2667000)
          Certainty of Finding (111012, DCM) = probability, unit UCUM "1"
          Threshold Value (122411, DCM) = threshold, unit UCUM "1"
      Qualitative Evaluations (C0034375, UMLS)
        Comment (121106, DCM) = "AI result ... not verified by a radiologist"

One group per finding keeps each probability and threshold attached to exactly
one finding code (a group carries a single finding context).

Sources are "listed" image by image when there are at most
:data:`MAX_LISTED_IMAGES` of them (a radiograph, one multi-frame image, a short
series). A longer series (a 300-slice CT) is referenced as a whole, which keeps
the document small and fast to build: each segment group names the source series
(121232, DCM, "Source Series for Segmentation") instead of its images, and the
optional per-image items (TID 1501 "Source" images, Image Library) are left out.
Either way the Current Requested Procedure Evidence Sequence lists every source
instance and the SEG."""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    ReferencedSegment,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForSegmentation,
    SourceSeriesForSegmentation,
    TextContentItem,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from models.base import Code, Finding, Prediction, Segment
from models.base import Measurement as ModelMeasurement
from node.results.common import (
    ResultContext,
    ResultKind,
    check_sources,
    coded,
    identify_local_schemes,
    no_patient_name_warning,
    source_headers,
)
from node.results.seg import segment_numbers, tracking_id, tracking_uid

#: Concepts come from ``pydicom.sr.codedict.codes`` where it names them; the others
#: are typed in as frozen ``models.base.Code`` values (each says why). Both become
#: (mutable) highdicom ``CodedConcept`` datasets at each use (:func:`coded`).

#: Segment categories whose type is an anatomic location, usable as a finding site.
ANATOMIC_CATEGORIES = tuple(
    (code.value, code.scheme_designator)
    for code in (codes.SCT.AnatomicalStructure, codes.SCT.BodyStructure)
)

#: Value of a finding's qualitative evaluation: SCT "Present" (qualifier value) ...
PRESENT = codes.SCT.Present
#: ... and its counterpart SCT 2667000 "Absent" (qualifier value). Typed in: codedict's
#: ``codes.SCT.Absent`` is another concept (272519000, "Absence findings").
ABSENT = Code("2667000", "SCT", "Absent")

#: Name of a finding's probability: CID 6048 "Certainty of Finding".
PROBABILITY = codes.DCM.CertaintyOfFinding

#: Name of the decision threshold applied to the probability.
THRESHOLD = codes.DCM.ThresholdValue

#: Unit of probability and threshold: fractions in [0, 1].
NO_UNITS = codes.UCUM.NoUnits

#: Document-level container of TID 1500 for qualitative evaluations and text. Typed in:
#: codedict has no name for this UMLS concept.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

#: Concept name of the disclaimer text.
COMMENT = codes.DCM.Comment

#: Language of the content tree. Typed in: codedict has no RFC 5646 (language) codes.
ENGLISH = Code("en-US", "RFC5646", "English (United States)")

#: Procedures Reported that codedict has no name for (typed in).
CT_OF_CHEST = Code("169069000", "SCT", "Computed tomography of chest")
XRAY_OF_CHEST = Code("399208008", "SCT", "Plain X-ray of chest")

_LO_MAX = 64

#: Most source images the report lists one by one (see :func:`lists_images`). Each
#: listed image adds content items to every group and an Image Library entry, which
#: highdicom copies and re-parses: a 300-slice CT listed image by image took seconds.
MAX_LISTED_IMAGES = 32

#: Attributes of a source that its evidence item (and the series reference) use.
_REFERENCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


def procedure_code(source: Dataset, ctx: ResultContext) -> CodedConcept:
    """Procedure Reported: ``ctx.procedure`` when set, else from Modality and Body Part.

    CT of the chest: SCT 169069000 "Computed tomography of chest"; radiograph (CR,
    DX, RG) of the chest: SCT 399208008 "Plain X-ray of chest"; otherwise the
    LOINC "... unspecified body region" codes of CID 100, and SCT 363679005
    "Imaging procedure" for any other modality.
    """
    if ctx.procedure is not None:
        return coded(ctx.procedure)
    modality = str(source.get("Modality", "")).upper()
    chest = str(source.get("BodyPartExamined", "")).upper() in ("CHEST", "THORAX", "LUNG")
    match modality:
        case "CT" if chest:
            return coded(CT_OF_CHEST)
        case "CT":
            return coded(codes.LN.CTUnspecifiedBodyRegion)
        case "CR" | "DX" | "RG" if chest:
            return coded(XRAY_OF_CHEST)
        case "CR" | "DX" | "RG":
            return coded(codes.LN.XRUnspecifiedBodyRegion)
        case "MR":
            return coded(codes.LN.MRIUnspecifiedBodyRegion)
        case "PT":
            return coded(codes.LN.PETUnspecifiedBodyRegion)
        case "NM":
            return coded(codes.LN.NMUnspecifiedBodyRegion)
        case _:
            return coded(codes.SCT.ImagingProcedure)


def disclaimer(ctx: ResultContext) -> str:
    """The note every report carries: an AI result, not verified by a radiologist."""
    return (
        f"Result of the AI algorithm {ctx.model_name} {ctx.algorithm_id_version} "
        f"({ctx.manufacturer} {ctx.software_version}). It has not been verified by a "
        "radiologist and must be reviewed by a qualified physician before clinical use."
    )


def _check_prediction(prediction: Prediction) -> None:
    if not isinstance(prediction, Prediction):
        raise TypeError(f"expected models.base.Prediction, got {type(prediction).__name__}")
    if not (prediction.segments or prediction.measurements or prediction.findings):
        raise ValueError("prediction has no segments, measurements or findings to report")
    numbers = {segment.number for segment in prediction.segments}
    for m in prediction.measurements:
        if not isinstance(m, ModelMeasurement):
            raise TypeError(f"expected models.base.Measurement, got {type(m).__name__}")
        if not math.isfinite(m.value):
            raise ValueError(f"measurement {m.name.meaning!r}: value {m.value} is not finite")
        if m.segment_number is not None and m.segment_number not in numbers:
            raise ValueError(
                f"measurement {m.name.meaning!r} refers to unknown segment {m.segment_number}"
            )
    for f in prediction.findings:
        if not isinstance(f, Finding):
            raise TypeError(f"expected models.base.Finding, got {type(f).__name__}")
        if not (0.0 <= f.probability <= 1.0) or not math.isfinite(f.threshold):
            raise ValueError(
                f"finding {f.name.meaning!r}: probability must be in [0, 1] and the "
                "threshold finite"
            )


def _check_seg(seg: Dataset | None, prediction: Prediction, study_uid: str) -> None:
    if not prediction.segments:
        return
    if seg is None:
        raise ValueError("prediction has segments but no SEG was given to reference")
    if seg.get("SOPClassUID") != SegmentationStorage:
        raise ValueError("seg is not a Segmentation Storage instance")
    if seg.get("StudyInstanceUID") != study_uid:
        raise ValueError("seg belongs to another study than the sources")
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    numbering = segment_numbers(prediction)
    for segment in prediction.segments:
        seg_number = numbering[segment.number]
        if labels.get(seg_number) != segment.label:
            raise ValueError(
                f"seg segment {seg_number} is {labels.get(seg_number)!r}, "
                f"expected {segment.label!r}: not the SEG of this prediction"
            )


def _measurement(m: ModelMeasurement) -> Measurement:
    return Measurement(
        name=coded(m.name),
        value=float(m.value),
        unit=coded(m.unit),
        derivation=coded(m.derivation) if m.derivation is not None else None,
    )


def _is_anatomic(category: Code) -> bool:
    return (category.value, category.scheme) in ANATOMIC_CATEGORIES


def lists_images(sources: Sequence[Dataset]) -> bool:
    """Whether the report references each source image, or only their series.

    True for at most :data:`MAX_LISTED_IMAGES` sources: then the segment groups
    list their source images, the other groups their "Source" images, and the
    Image Library describes them. A larger series is referenced as a whole: the
    segment groups name the source series (TID 1411 allows either), and the other
    groups and the Image Library, both optional, leave the images out.
    """
    return len(sources) <= MAX_LISTED_IMAGES


def _segment_group(
    segment: Segment,
    seg_number: int,
    seg: Dataset,
    headers: Sequence[Dataset],
    prediction: Prediction,
    ctx: ResultContext,
    algorithm: AlgorithmIdentification,
) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    # Built by hand: ReferencedSegment.from_segmentation() fails on a one-segment SEG.
    if lists_images(headers):
        referenced = ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=seg_number,
            source_images=[SourceImageForSegmentation.from_source_image(h) for h in headers],
        )
    else:
        referenced = ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=seg_number,
            source_series=SourceSeriesForSegmentation(headers[0].SeriesInstanceUID),
        )
    sites = None
    if _is_anatomic(segment.category):
        laterality = coded(segment.type_modifier) if segment.type_modifier is not None else None
        sites = [FindingSite(anatomic_location=coded(segment.type), laterality=laterality)]
    measurements = [
        _measurement(m)
        for m in prediction.measurements
        if m.segment_number == segment.number
    ]
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(ctx, seg_number), identifier=tracking_id(segment)
        ),
        referenced_segment=referenced,
        finding_type=coded(segment.type),
        finding_category=coded(segment.category),
        finding_sites=sites,
        algorithm_id=algorithm,
        measurements=measurements or None,
    )


def _finding_group(
    index: int,
    finding: Finding,
    headers: Sequence[Dataset],
    ctx: ResultContext,
    algorithm: AlgorithmIdentification,
) -> MeasurementsAndQualitativeEvaluations:
    name = coded(finding.name)
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=ctx.job_uid("finding", str(index), finding.name.scheme, finding.name.value),
            identifier=f"AI finding: {finding.name.meaning}"[:_LO_MAX],
        ),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            QualitativeEvaluation(name=name, value=coded(PRESENT if finding.present else ABSENT))
        ],
        measurements=[
            Measurement(
                name=coded(PROBABILITY),
                value=float(finding.probability),
                unit=coded(NO_UNITS),
            ),
            Measurement(
                name=coded(THRESHOLD), value=float(finding.threshold), unit=coded(NO_UNITS)
            ),
        ],
        source_images=_group_sources(headers),
    )


def _study_group(
    measurements: Sequence[ModelMeasurement],
    headers: Sequence[Dataset],
    ctx: ResultContext,
    algorithm: AlgorithmIdentification,
) -> MeasurementsAndQualitativeEvaluations:
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=ctx.job_uid("study-measurements"), identifier="AI study measurements"
        ),
        algorithm_id=algorithm,
        measurements=[_measurement(m) for m in measurements],
        source_images=_group_sources(headers),
    )


def _group_sources(headers: Sequence[Dataset]) -> list[SourceImageForMeasurementGroup] | None:
    """The "Source" images of a TID 1501 group (optional): all sources, if listed at all."""
    if not lists_images(headers):
        return None
    return [SourceImageForMeasurementGroup.from_source_image(h) for h in headers]


def _disclaimer_container(ctx: ResultContext) -> ContainerContentItem:
    container = ContainerContentItem(
        name=coded(QUALITATIVE_EVALUATIONS), relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = ContentSequence(
        [
            TextContentItem(
                name=coded(COMMENT),
                value=disclaimer(ctx),
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container


#: What highdicom raises when a source lacks an attribute an Image Library entry needs.
_LIBRARY_ERRORS = (AttributeError, IndexError, KeyError, TypeError, ValueError)


def build_report(
    headers: Sequence[Dataset],
    prediction: Prediction,
    ctx: ResultContext,
    seg: Dataset | None,
) -> MeasurementReport:
    """The TID 1500 content tree (see the module docstring); inputs already checked.

    ``headers`` has one dataset per source, in order: full header copies when the
    sources are listed (see :func:`lists_images`), else the first one's header
    followed by just the UIDs of the others (what :func:`build_sr` passes).
    """
    algorithm = AlgorithmIdentification(name=ctx.model_name, version=ctx.algorithm_id_version)
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=ctx.device_uid(),
            name=ctx.model_name,
            manufacturer_name=ctx.manufacturer,
            model_name=ctx.device_model_name,
            serial_number=ctx.device_serial_number,
        ),
    )
    groups: list[
        VolumetricROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
    ] = []
    if prediction.segments:
        if seg is None:
            raise ValueError("prediction has segments but no SEG was given to reference")
        numbering = segment_numbers(prediction)
        for segment in sorted(prediction.segments, key=lambda s: numbering[s.number]):
            seg_number = numbering[segment.number]
            groups.append(
                _segment_group(segment, seg_number, seg, headers, prediction, ctx, algorithm)
            )
    study_measurements = [m for m in prediction.measurements if m.segment_number is None]
    if study_measurements:
        groups.append(_study_group(study_measurements, headers, ctx, algorithm))
    for index, finding in enumerate(prediction.findings, start=1):
        groups.append(_finding_group(index, finding, headers, ctx, algorithm))

    def report_with(library: list[Dataset] | None) -> MeasurementReport:
        return MeasurementReport(
            observation_context=ObservationContext(observer_device_context=observer),
            procedure_reported=procedure_code(headers[0], ctx),
            imaging_measurements=groups,
            title=codes.cid7021.ImagingMeasurementReport,
            language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(
                coded(ENGLISH)
            ),
            referenced_images=library,
        )

    # The Image Library (TID 1500 row 5) is optional. It describes the listed
    # sources (see lists_images) and is left out when a source lacks what
    # highdicom's TID 1602-1604 descriptors need, e.g. PatientOrientation and
    # ImagerPixelSpacing for a radiograph, or PixelSpacing and ImagePositionPatient
    # per slice for CT, which minimal headers (converted secondary captures,
    # enhanced multi-frame) lack. highdicom builds the library before it touches
    # the groups; an error that is not the library's comes again without it.
    try:
        report = report_with(list(headers) if lists_images(headers) else None)
    except _LIBRARY_ERRORS:
        if not lists_images(headers):
            raise
        report = report_with(None)
    report[0].ContentSequence.append(_disclaimer_container(ctx))
    return report


def _instance_reference(source: Dataset) -> Dataset:
    """The UIDs of ``source`` an evidence item needs, and nothing else."""
    reference = Dataset()
    for keyword in _REFERENCE_KEYWORDS:
        setattr(reference, keyword, source[keyword].value)
    return reference


def _report_headers(sources: Sequence[Dataset]) -> list[Dataset]:
    """What the report is built from, one dataset per source, in order.

    Listed sources (see :func:`lists_images`) need their full headers (image
    references, Image Library). Otherwise only the first one's is needed (patient,
    study, procedure, series); the others are evidence only, so they are just
    their UIDs, which saves copying and checking hundreds of headers.
    """
    if lists_images(sources):
        return source_headers(sources)
    check_sources(sources)
    return [*source_headers(sources[:1]), *(_instance_reference(ds) for ds in sources[1:])]


def build_sr(
    sources: Sequence[Dataset],
    prediction: Prediction,
    ctx: ResultContext,
    seg: Dataset | None,
) -> hd.sr.Comprehensive3DSR:
    """Return the TID 1500 Measurement Report of ``prediction`` as a Comprehensive 3D SR.

    ``seg`` is the SEG built by :func:`node.results.seg.build_seg` from the same
    sources and prediction; it is required when the prediction has segments (each
    segment's group references its SEG segment) and ignored otherwise. The SR is
    COMPLETE, UNVERIFIED and PRELIMINARY (awaiting a radiologist), carries the
    sources' patient and study attributes, and lists the sources (and the SEG) as
    evidence. Raises ``ValueError`` for an empty prediction or inconsistent input.
    """
    if not isinstance(ctx, ResultContext):
        raise TypeError(f"expected ResultContext, got {type(ctx).__name__}")
    _check_prediction(prediction)
    headers = _report_headers(sources)
    _check_seg(seg, prediction, headers[0].StudyInstanceUID)
    referenced_seg = seg if prediction.segments else None

    report = build_report(headers, prediction, ctx, referenced_seg)
    evidence: list[Dataset] = list(headers)
    if referenced_seg is not None:
        evidence.append(referenced_seg)
    with no_patient_name_warning():
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            is_complete=True,
            is_final=False,
            is_verified=False,
            **ctx.identity(ResultKind.SR),
        )
    identify_local_schemes(sr, sr.ContentSequence)
    return sr

