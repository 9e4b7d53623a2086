"""What every DICOM result object needs: algorithm identity, deterministic UIDs, source headers.

UIDs are derived from a seed (``ResultContext.uid_seed``) with a SHA-512 hash. The
worker passes the job's ``uid_seed`` column (``db.schema.Job.uid_seed``): a random
hex string made when the job is queued and stored with it, so re-running a job
after a crash (or an admin retry) yields the same Series and SOP Instance UIDs
and the PACS overwrites the earlier object instead of storing a duplicate, while a
new run of the series (a new job) gets new UIDs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypedDict

from highdicom.sr import CodedConcept
from highdicom.valuerep import _check_specific_character_set  # private; pinned < 0.29
from pydicom import config
from pydicom.charset import STAND_ALONE_ENCODINGS, python_encoding
from pydicom.datadict import dictionary_is_retired, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sr.coding import Code as DicomCode
from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid
from pydicom.valuerep import VR, validate_value

from db.schema import ResultKind as ResultKind  # re-exported to the builders
from models.base import Code

log = logging.getLogger("ainode.results")

#: Root of every UID this package derives; a hospital may pass its own root instead.
DEFAULT_UID_PREFIX: str = PYDICOM_ROOT_UID

#: Longest prefix ``pydicom.uid.generate_uid`` accepts (it appends at least 10 digits).
_MAX_UID_PREFIX_LENGTH = 54

#: Longest value of a DICOM LO (Long String) element.
_LO_MAX = 64

#: Largest value of a DICOM IS (Integer String) element.
_IS_MAX = 2**31 - 1

#: Pixel data elements, dropped from the header copies given to highdicom.
_BULK_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_BULK_TAGS = frozenset(tag_for_keyword(keyword) for keyword in _BULK_KEYWORDS)

#: Specific Character Set, which decides how a raw text value reads.
_CHARSET_TAG = 0x00080005

#: What an empty value 1 of a multi-valued Specific Character Set stands for (PS3.3 C.12.1.1.2).
_DEFAULT_WITH_EXTENSIONS = "ISO 2022 IR 6"

#: Specific Character Set of a result whose source's cannot be carried over: UTF-8.
_UTF8 = "ISO_IR 192"

#: Type 2 patient/study attributes highdicom reads with attribute access (they must exist).
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

#: General Study attributes outside the patient groups (0010, 0012) that derived objects copy.
_STUDY_KEYWORDS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "ConsultingPhysicianName",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "StudyID",
    "RequestingService",
)

#: Patient's Sex enumerated values (PS3.3 C.7.1.1).
_PATIENT_SEX_VALUES = ("M", "F", "O")

#: Spacing attributes whose values must be positive numbers (a ``0\0`` is dropped).
_SPACING_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")


def derive_uid(prefix: str, *parts: str) -> UID:
    """Return a UID under ``prefix`` that depends only on ``parts`` (deterministic).

    Each part is length-prefixed before hashing, so ("ab", "c") and ("a", "bc")
    give different UIDs (``generate_uid`` joins its entropy sources without a
    separator).
    """
    if not parts or any(not isinstance(part, str) for part in parts):
        raise ValueError("derive_uid needs at least one str part")
    if not prefix.endswith(".") or len(prefix) > _MAX_UID_PREFIX_LENGTH:
        raise ValueError(
            f"UID prefix must end with '.' and have at most {_MAX_UID_PREFIX_LENGTH} "
            f"characters, got {prefix!r}"
        )
    return generate_uid(prefix=prefix, entropy_srcs=[f"{len(p)}:{p}" for p in parts])


def result_uids(
    seed: str, kind: ResultKind | str, prefix: str = DEFAULT_UID_PREFIX
) -> tuple[UID, UID]:
    """Return ``(series_instance_uid, sop_instance_uid)`` for the result ``kind`` of ``seed``.

    The same seed and kind always give the same pair; another seed or kind gives
    another pair.
    """
    if not seed:
        raise ValueError("uid seed must not be empty")
    kind = ResultKind(kind)
    series_uid = derive_uid(prefix, "ainode-result", seed, kind.value, "series")
    return series_uid, result_instance_uid(seed, kind, 1, prefix)


def result_instance_uid(
    seed: str, kind: ResultKind | str, index: int, prefix: str = DEFAULT_UID_PREFIX
) -> UID:
    """SOP Instance UID of instance ``index`` (1-based, its Instance Number) of result ``kind``.

    Index 1 is the instance UID of :func:`result_uids`; every other index of a
    multi-image result (the secondary-capture images) gets its own UID, the same
    for the same seed, kind and index. All share the series UID of
    :func:`result_uids`.
    """
    if not seed:
        raise ValueError("uid seed must not be empty")
    kind = ResultKind(kind)
    if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= _IS_MAX:
        raise ValueError(f"instance index must be an int in 1..{_IS_MAX}, got {index!r}")
    if index == 1:
        return derive_uid(prefix, "ainode-result", seed, kind.value, "instance")
    return derive_uid(prefix, "ainode-result", seed, kind.value, "instance", str(index))


def series_description(model_name: str, version: str, kind: ResultKind | str) -> str:
    """Return e.g. ``"AI ct-lung 1.0.0 SEG"`` or ``"AI cxr-pneumonia 1.0.0 HEATMAP"``.

    The model part is cut so that the whole fits the 64 characters a LO allows.
    """
    if not model_name.strip() or not version.strip():
        raise ValueError("model name and version must not be empty")
    kind = ResultKind(kind)
    text = f"AI {model_name.strip()} {version.strip()}"
    suffix = f" {kind.value}"
    return text[: _LO_MAX - len(suffix)] + suffix


def _check_lo(name: str, value: str, *, required: bool = True) -> None:
    if required and not value.strip():
        raise ValueError(f"{name} must not be empty")
    if len(value) > _LO_MAX or "\\" in value:
        raise ValueError(f"{name} must be at most {_LO_MAX} characters without '\\': {value!r}")


class Identity(TypedDict):
    """What identifies one result object and its maker (highdicom's constructor arguments)."""

    series_instance_uid: str
    series_number: int
    sop_instance_uid: str
    instance_number: int
    series_description: str
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str


@dataclass(frozen=True)
class ResultContext:
    """What every result object of one job needs besides the sources and the prediction.

    ``model_version`` goes into series descriptions; ``algorithm_version`` (for
    example the version plus a weights hash, ``Model.algorithm_version``) into the
    algorithm identification and defaults to ``model_version``. ``uid_seed``
    determines the result UIDs (see :func:`result_uids`): the worker passes the
    job's stored seed (``db.schema.Job.uid_seed``), the same for every attempt of
    the job.
    """

    model_name: str
    model_version: str
    software_version: str
    uid_seed: str
    algorithm_version: str = ""
    manufacturer: str = "ainode"
    device_serial_number: str = "ainode"
    series_number_base: int = 900
    uid_prefix: str = DEFAULT_UID_PREFIX
    procedure: Code | None = None

    def __post_init__(self) -> None:
        _check_lo("model_name", self.model_name)
        _check_lo("model_version", self.model_version)
        _check_lo("software_version", self.software_version)
        _check_lo("algorithm_version", self.algorithm_version, required=False)
        _check_lo("manufacturer", self.manufacturer)
        _check_lo("device_serial_number", self.device_serial_number)
        _check_lo("device model name", f"{self.model_name} {self.model_version}")
        if not self.uid_seed:
            raise ValueError("uid_seed must not be empty")
        max_offset = max(kind.series_offset for kind in ResultKind)
        if not 0 <= self.series_number_base <= _IS_MAX - max_offset:
            raise ValueError(f"series_number_base out of range: {self.series_number_base}")
        # Fails early on a bad prefix instead of in the middle of a build.
        derive_uid(self.uid_prefix, "check")

    @property
    def algorithm_id_version(self) -> str:
        """The version written into algorithm identifications."""
        return self.algorithm_version or self.model_version

    @property
    def device_model_name(self) -> str:
        """Model name of the device observer: model name and version."""
        return f"{self.model_name} {self.model_version}"

    def uids(self, kind: ResultKind | str) -> tuple[UID, UID]:
        """``(series_instance_uid, sop_instance_uid)`` of this job's result of ``kind``."""
        return result_uids(self.uid_seed, kind, self.uid_prefix)

    def instance_uid(self, kind: ResultKind | str, index: int) -> UID:
        """SOP Instance UID of image ``index`` (1-based) of this job's result of ``kind``.

        ``instance_uid(kind, 1)`` equals ``uids(kind)[1]``.
        """
        return result_instance_uid(self.uid_seed, kind, index, self.uid_prefix)

    def series_number(self, kind: ResultKind | str) -> int:
        """Series Number of this job's result of ``kind``."""
        return self.series_number_base + ResultKind(kind).series_offset

    def series_description(self, kind: ResultKind | str) -> str:
        """Series Description of this job's result of ``kind``."""
        return series_description(self.model_name, self.model_version, kind)

    def identity(self, kind: ResultKind | str, number: int = 1) -> Identity:
        """The identifying arguments every highdicom constructor takes, for image ``number``
        (1-based) of this job's result of ``kind``: UIDs, numbers, description, device."""
        series_uid, _ = self.uids(kind)
        return {
            "series_instance_uid": series_uid,
            "series_number": self.series_number(kind),
            "sop_instance_uid": self.instance_uid(kind, number),
            "instance_number": number,
            "series_description": self.series_description(kind),
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.model_name,
            "software_versions": self.software_version,
            "device_serial_number": self.device_serial_number,
        }

    def job_uid(self, *parts: str) -> UID:
        """A UID that depends on the seed and ``parts`` (e.g. a segment's tracking UID)."""
        return derive_uid(self.uid_prefix, "ainode-job", self.uid_seed, *parts)

    def device_uid(self) -> UID:
        """UID of the algorithm as a device observer: same for every job of one version."""
        return derive_uid(
            self.uid_prefix, "ainode-device", self.manufacturer, self.model_name,
            self.algorithm_id_version,
        )


def check_sources(sources: Sequence[Dataset]) -> None:
    """Raise ``ValueError`` unless ``sources`` are non-empty instances of one study.

    Each needs SOPClassUID, SOPInstanceUID, SeriesInstanceUID and StudyInstanceUID,
    and the SOP Instance UIDs must be distinct.
    """
    if len(sources) == 0:
        raise ValueError("no source instances given")
    seen: set[str] = set()
    for index, ds in enumerate(sources):
        if not isinstance(ds, Dataset):
            raise TypeError(f"source {index} is {type(ds).__name__}, not a pydicom Dataset")
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f"source {index} lacks {keyword}")
        if ds.SOPInstanceUID in seen:
            raise ValueError(f"source SOP Instance UID {ds.SOPInstanceUID} given twice")
        seen.add(ds.SOPInstanceUID)
    studies = {ds.StudyInstanceUID for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"sources belong to {len(studies)} studies, expected one")


def _is_patient_study_element(tag: int) -> bool:
    """Whether ``tag`` is a patient or General Study attribute (by tag: nothing is converted)."""
    group = tag >> 16
    if group in (0x0010, 0x0012):
        return True
    return keyword_for_tag(tag) in _STUDY_KEYWORDS


def _copy_element(elem: DataElement | RawDataElement) -> DataElement | RawDataElement:
    """A copy of ``elem``: setting its value (or changing a sequence) leaves ``elem`` as it was.

    A raw (not yet converted) element is an immutable tuple and is shared; a
    sequence is copied item by item; any other element is copied shallowly: its
    value (str, number, ``MultiValue``, ``PersonName``) is shared, and neither
    this package nor highdicom changes a source value in place (they replace it).
    """
    if isinstance(elem, RawDataElement):
        return elem
    if elem.VR == VR.SQ:
        return DataElement(elem.tag, VR.SQ, [_copy_item(item) for item in elem.value])
    return copy.copy(elem)


def _copy_item(item: Dataset) -> Dataset:
    """Copy a sequence item: the copy's raw text reads with the character set the item
    inherited from its dataset (PS3.5 7.5.3), as the item's does."""
    copied = _copy_dataset(item)
    copied._parent_encoding = item._parent_encoding
    return copied


def _copy_dataset(ds: Dataset, *, header: bool = False) -> Dataset:
    """Copy ``ds`` element by element without converting raw elements.

    With ``header``, private elements and pixel data are left out. Much cheaper
    than ``copy.deepcopy``, which converts and copies every value of a source.
    """
    return Dataset({
        elem.tag: _copy_element(elem)
        for elem in ds.elements()
        if not (header and (elem.tag.is_private or elem.tag in _BULK_TAGS))
    })


def _copy_header(ds: Dataset) -> Dataset:
    """Copy ``ds`` without pixel data and private elements, with its file meta.

    Elements not yet read stay raw in the copy (converted when something reads
    them), so a 300-slice series is copied in tens of milliseconds. The caller's
    dataset is neither changed nor converted.
    """
    header = _copy_dataset(ds, header=True)
    if hasattr(ds, "file_meta"):
        meta = FileMetaDataset()
        meta.update(_copy_dataset(ds.file_meta))
        header.file_meta = meta
    return header


@contextlib.contextmanager
def _quiet_conversion() -> Iterator[None]:
    """Silence pydicom's warnings about source values invalid for their VR.

    Reading an element converts it and lets pydicom warn about a value invalid for
    its VR; such a warning may quote the value (patient data), and the
    patient/study values are checked and fixed right after, so they are silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.valuerep")
        yield


def _is_valid(elem: DataElement) -> bool:
    """Whether every value of ``elem`` is valid for its VR (a sequence or empty one is)."""
    if elem.VR == VR.SQ or elem.is_empty:
        return True
    values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
    try:
        for value in values:
            validate_value(elem.VR, value, config.RAISE)
    except ValueError:
        return False
    return True


def _hashable(value: object) -> Hashable:
    return tuple(value) if isinstance(value, MultiValue) else value


def _clear_invalid_patient_study_values(header: Dataset, verdicts: dict[Hashable, bool]) -> None:
    """Empty every patient/study value of ``header`` that is invalid for its VR.

    Only the patient/study elements are read (converted); the others stay raw.
    ``verdicts`` remembers, per raw encoding (tag, VR, bytes, transfer syntax,
    character set), whether an element was valid: the slices of a series repeat
    their patient/study values, so a raw element already judged is left raw
    (valid) or emptied without being converted and checked again.
    """
    charset = header.get_item(_CHARSET_TAG)
    charset_key = None if charset is None else _hashable(charset.value)
    tags = list(header.keys())
    for tag in [tag for tag in tags if _is_patient_study_element(tag)]:
        raw = header.get_item(tag)
        key: Hashable = None
        if isinstance(raw, RawDataElement):
            key = (tag, raw.VR, raw.value, raw.is_little_endian, raw.is_implicit_VR, charset_key)
            known = verdicts.get(key)
            if known is not None:
                if not known:
                    header[tag].value = None
                continue
        elem = header[tag]
        valid = _is_valid(elem)
        if not valid:
            elem.value = None
        if key is not None:
            verdicts[key] = valid


def _charset_terms(value: str | Sequence[str] | None) -> list[str]:
    """The defined terms of a Specific Character Set value, stripped, without empty ones.

    An empty value 1 of several is the ISO 2022 IR 6 it stands for (PS3.3
    C.12.1.1.2); a value that is empty altogether means the default repertoire: no terms.
    """
    if value is None:
        return []
    terms = [value.strip()] if isinstance(value, str) else [str(v).strip() for v in value]
    if len(terms) > 1 and not terms[0]:
        terms[0] = _DEFAULT_WITH_EXTENSIONS
    return [term for term in terms if term]


def _result_charset(terms: list[str]) -> str | list[str] | None:
    """``terms`` as highdicom's result constructors accept them, or None when they refuse them.

    They accept the defined terms of PS3.3 C.12.1.1.2 that pydicom can also encode,
    combined as the standard allows (code extensions only with ISO 2022 terms, no
    multi-byte term first).
    """
    if not all(term in python_encoding for term in terms):
        return None
    try:
        checked = _check_specific_character_set(terms)
    except ValueError:
        return None
    return checked if isinstance(checked, str) else list(checked)


def _decodable_charset(terms: list[str]) -> list[str]:
    """The part of ``terms`` pydicom decodes with, without a warning.

    An unknown value 1 reads as the default repertoire (its ASCII decodes, other
    bytes as pydicom's default, Latin-1); unknown code extensions and stand-alone
    terms after value 1 are dropped (pydicom ignores them too).
    """
    first, *rest = terms
    if first not in python_encoding:
        first = _DEFAULT_WITH_EXTENSIONS
    if first in STAND_ALONE_ENCODINGS:
        return [first]
    return [first, *(t for t in rest if t in python_encoding and t not in STAND_ALONE_ENCODINGS)]


def _settle_charset(header: Dataset) -> list[str]:
    """Give ``header`` a Specific Character Set its result can carry; the terms it could
    not keep (none when it kept them).

    Terms highdicom accepts are kept (an empty value 1 of several becomes ISO 2022
    IR 6, a value that is empty altogether is removed). Otherwise every raw value of
    ``header``, its sequence items included, is decoded with what pydicom can make
    of the terms, and the text is written as UTF-8 (ISO_IR 192). Values already
    decoded are text and stay as they are.
    """
    if _CHARSET_TAG not in header:
        return []
    terms = _charset_terms(header.SpecificCharacterSet)
    if not terms:
        del header[_CHARSET_TAG]
        return []
    charset = _result_charset(terms)
    if charset is not None:
        header.SpecificCharacterSet = charset
        return []
    header.SpecificCharacterSet = _decodable_charset(terms)
    # Reading an element decodes it, in sequence items too (a raw one would be
    # written as its source bytes); what is decoded is written in the new set.
    header.walk(lambda _ds, _elem: None)
    header.SpecificCharacterSet = _UTF8
    return terms


def _drop_invalid_spacing(header: Dataset) -> None:
    """Delete a pixel spacing attribute whose values are not two positive numbers.

    Some radiographs carry ``PixelSpacing = 0\\0``; highdicom copies it into a
    SEG's Pixel Measures, which ``dciodvfy`` rejects. Without it highdicom falls
    back to the next spacing attribute or leaves Pixel Measures out.
    """
    for keyword in _SPACING_KEYWORDS:
        value = header.get(keyword)
        if value is None:
            continue
        try:
            pair = [float(v) for v in value] if isinstance(value, MultiValue) else []
        except (TypeError, ValueError):
            pair = []
        if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
            delattr(header, keyword)


def source_headers(sources: Sequence[Dataset]) -> list[Dataset]:
    """Return copies of the sources' headers that highdicom can copy into a valid result.

    The copies drop pixel data and private elements (highdicom needs neither), add the Type 2
    patient/study attributes a source lacks as empty values, and empty any
    patient/study value that is invalid for its VR (e.g. PatientAge ``"81"``) or
    a Patient's Sex outside M/F/O. A Pixel Spacing, Imager Pixel Spacing or
    Nominal Scanned Pixel Spacing that is not two positive numbers (``0\\0``) is
    dropped. Valid values are kept unchanged. The caller's datasets are not modified.

    A Specific Character Set highdicom refuses (an unknown term, a bad combination)
    becomes UTF-8, the text decoded as far as its terms allow; one warning is logged.
    """
    check_sources(sources)
    headers: list[Dataset] = []
    verdicts: dict[Hashable, bool] = {}
    refused: set[str] = set()
    for ds in sources:
        header = _copy_header(ds)
        with _quiet_conversion():
            if terms := _settle_charset(header):
                refused.add("\\".join(terms))
            _clear_invalid_patient_study_values(header, verdicts)
            if header.get("PatientSex", "") not in ("", *_PATIENT_SEX_VALUES):
                header.PatientSex = None
            for keyword in _TYPE2_PATIENT_STUDY:
                if keyword not in header:
                    setattr(header, keyword, None)
            _drop_invalid_spacing(header)
        headers.append(header)
    if refused:
        log.warning("study %s: Specific Character Set %s not usable in results; their text "
                    "is re-encoded as %s", sources[0].StudyInstanceUID,
                    " or ".join(sorted(refused)), _UTF8)
    return headers


def _is_retired(tag: int) -> bool:
    """Whether ``tag`` is a retired standard attribute (unknown tags are not)."""
    try:
        return bool(dictionary_is_retired(tag))
    except KeyError:
        return False


def patient_study_elements(header: Dataset) -> Dataset:
    """The patient and study attributes of ``header`` (a :func:`source_headers` copy).

    Everything in the patient groups (0010, 0012: Patient, Patient Study, Clinical
    Trial modules), the General Study attributes a derived object copies, the Study
    Instance UID and the Specific Character Set, as deep copies; retired attributes
    (e.g. Other Patient IDs) are left out.
    """
    out = Dataset()
    for elem in header:
        if elem.tag.is_private or _is_retired(elem.tag):
            continue
        if (
            _is_patient_study_element(elem.tag)
            or elem.keyword in ("StudyInstanceUID", "SpecificCharacterSet")
        ):
            out.add(copy.deepcopy(elem))
    return out


def coded(code: Code | DicomCode) -> CodedConcept:
    """A highdicom ``CodedConcept`` of a model :class:`~models.base.Code` or of a pydicom code.

    The package's own concepts come from ``pydicom.sr.codedict.codes`` (e.g.
    ``codes.DCM.Comment``) wherever it names them, and are typed in where it does not.
    """
    if isinstance(code, DicomCode):
        return CodedConcept.from_code(code)
    if not isinstance(code, Code):
        raise TypeError(f"expected models.base.Code or a pydicom Code, got {type(code).__name__}")
    if not code.value or not code.scheme or not code.meaning:
        raise ValueError(f"code needs a value, a scheme and a meaning: {code!r}")
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


@contextlib.contextmanager
def no_patient_name_warning() -> Iterator[None]:
    """Silence highdicom's "unlikely to represent the intended person name" warning.

    highdicom warns when the Patient's Name copied from the source has a single
    component, and the warning text contains the name: it must not reach a log.
    ``warnings.catch_warnings`` changes process-wide state; other warnings emitted
    by other threads while a result is built are unaffected except for this one.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"The string .* is unlikely to represent the intended person name",
            category=UserWarning,
        )
        yield


def drop_unreadable_pixel_measures(seg: Dataset) -> None:
    """Remove a shared Pixel Measures item without Slice Thickness from a SEG without a frame
    of reference (a SEG of a projection radiograph).

    highdicom writes Pixel Spacing alone for such a SEG, which the standard allows
    (Slice Thickness is required only with a Frame of Reference, PS3.3 C.7.6.16.2.1,
    CP 1426), but its own reader (``segread``) then fails with "Sequence does not
    have the required attributes for a Pixel Measures Sequence". The SEG has the
    source's matrix, so a viewer needs no spacing to overlay it; without the item
    ``dciodvfy`` still reports zero errors.
    """
    if "FrameOfReferenceUID" in seg:
        return
    shared = seg.get("SharedFunctionalGroupsSequence")
    if not shared or "PixelMeasuresSequence" not in shared[0]:
        return
    measures = shared[0].PixelMeasuresSequence
    if len(measures) == 1 and "SliceThickness" in measures[0]:
        return
    del shared[0].PixelMeasuresSequence


def _designators(items: Sequence[Dataset]) -> set[str]:
    """Every Coding Scheme Designator in ``items`` and their nested sequences."""
    found: set[str] = set()
    for item in items:
        for element in item:
            if element.keyword == "CodingSchemeDesignator":
                found.add(str(element.value))
            elif element.VR == "SQ":
                found |= _designators(element.value)
    return found


def identify_local_schemes(ds: Dataset, items: Sequence[Dataset]) -> None:
    """List the local ("99...") coding schemes used in ``items`` in ``ds``'s Coding Scheme
    Identification Sequence."""
    local = sorted(d for d in _designators(items) if d.startswith("99"))
    if not local:
        return
    entries = []
    for designator in local:
        entry = Dataset()
        entry.CodingSchemeDesignator = designator
        entry.CodingSchemeName = "ainode local codes"
        entry.CodingSchemeResponsibleOrganization = "ainode project"
        entries.append(entry)
    ds.CodingSchemeIdentificationSequence = entries
