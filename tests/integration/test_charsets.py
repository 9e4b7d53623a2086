"""Results of studies in other character sets: Japanese (ISO 2022 IR 87) and unknown terms.

The 30-slice chest CT is written with a Japanese Specific Character Set and names
and read back, so its text is raw bytes as the worker reads it; SEG and SR built
from it must pass dciodvfy and carry the names decoded correctly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset

from node.results.common import source_headers
from tests.integration.test_results import (
    CT_DIR,
    Case,
    build_case,
    context,
    ct_shape,
    lung_prediction,
)
from tests.peers import dciodvfy

#: ``\ISO 2022 IR 87``: value 1 empty, the Japanese file of PS3.5 H.3.1 (pydicom's chrH31).
JAPANESE = ["", "ISO 2022 IR 87"]
#: What results carry for it: the empty value 1 is ISO 2022 IR 6 (PS3.3 C.12.1.1.2).
JAPANESE_RESULT = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
ISSUER = "山田病院"


def japanese_name() -> str:
    """Patient's Name of pydicom's chrH31.dcm: Yamada^Tarou=山田^太郎=やまだ^たろう."""
    (path,) = get_charset_files("chrH31.dcm")
    source = pydicom.dcmread(path)
    assert list(source.SpecificCharacterSet) == JAPANESE
    return str(source.PatientName)


NAME = japanese_name()
#: Korean in ISO 2022 IR 149 (pydicom's chrKoreanMulti): valid, but highdicom 0.28 knows
#: Korean as "ISO 2022 IR 159" (a typo of its enum), so it refuses the term.
KOREAN = ["", "ISO 2022 IR 149"]


def written_and_read(directory: Path, charset: str | list[str], name: str,
                     issuer: str = ISSUER) -> list[Dataset]:
    """The chest CT written with ``charset``, ``name`` and an Other Patient IDs item of
    ``issuer``, read back (its text raw, unconverted)."""
    directory.mkdir()
    for path in sorted(CT_DIR.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        other = Dataset()
        other.PatientID = "OTHER-1"
        other.IssuerOfPatientID = issuer
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = [other]
        ds.save_as(directory / path.name)
    slices = [pydicom.dcmread(path) for path in sorted(directory.glob("*.dcm"))]
    return sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))


def build(directory: Path, sources: Sequence[Dataset]) -> Case:
    return build_case(directory, "charset", sources, lung_prediction(ct_shape(sources)),
                      context(f"job-{directory.name}"))


def check_valid(case: Case) -> list[Dataset]:
    """The case's SEG and SR pass dciodvfy; they are returned as read from their files."""
    assert case.seg_path is not None
    read = []
    for path in (case.seg_path, case.sr_path):
        assert dciodvfy(path).errors == []
        read.append(pydicom.dcmread(path))
    return read


@pytest.fixture(scope="module")
def japanese(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return written_and_read(tmp_path_factory.mktemp("jp") / "ct", JAPANESE, NAME)


def test_japanese_study_gets_seg_and_sr(japanese: list[Dataset], tmp_path: Path) -> None:
    for ds in japanese:
        assert "PatientName" in ds and ds.get_item("PatientName").value.startswith(b"Yamada")
    for result in check_valid(build(tmp_path, japanese)):
        # ISO 2022 escape to JIS X 0208, as PS3.5 H.3.1 encodes it
        assert b"\x1b$B" in result.get_item("PatientName").value
        assert list(result.SpecificCharacterSet) == JAPANESE_RESULT
        assert str(result.PatientName) == NAME
        assert result.PatientName.ideographic == "山田^太郎"


def test_sequence_items_keep_their_inherited_character_set(japanese: list[Dataset]) -> None:
    source = japanese[0]
    # A sequence the node has read already: its items hold the Japanese text raw.
    assert source.OtherPatientIDsSequence[0].get_item("IssuerOfPatientID").value.startswith(
        b"\x1b$B")
    (header,) = source_headers([source])
    assert header.OtherPatientIDsSequence[0].IssuerOfPatientID == ISSUER


# Every read of a source with an unknown term makes pydicom warn (its UIDs included);
# the node's own warning is the one logged below.
@pytest.mark.filterwarnings("ignore:Unknown encoding 'ISO_IR 999':UserWarning")
@pytest.mark.filterwarnings("ignore:Unknown encoding 'ISO 2022 IR 999':UserWarning")
@pytest.mark.parametrize(("written", "declared", "name", "issuer"), [
    # The Japanese still decodes: only the unknown code extension is dropped.
    (JAPANESE, ["", "ISO 2022 IR 87", "ISO 2022 IR 999"], NAME, ISSUER),
    (JAPANESE, "ISO_IR 999", "Doe^John", "General Hospital"),
    (KOREAN, KOREAN, "김희중", "서울병원"),
], ids=["unknown-extension", "unknown-term", "refused-korean"])
def test_unusable_terms_fall_back_to_utf8(written: list[str], declared: str | list[str],
                                          name: str, issuer: str, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    sources = written_and_read(tmp_path / "ct", written, name, issuer)
    for ds in sources:  # as a file with this Specific Character Set reads: text still raw
        ds.SpecificCharacterSet = declared
        assert not isinstance(ds.get_item("PatientName"), pydicom.DataElement)
    with caplog.at_level(logging.WARNING, logger="ainode.results"):
        case = build(tmp_path, sources)
    warned = [r for r in caplog.records if r.name == "ainode.results"]
    assert len(warned) == 2  # one per object built (SEG, SR), not one per slice
    term = declared if isinstance(declared, str) else declared[-1]
    assert all(term in r.getMessage() and "ISO_IR 192" in r.getMessage() for r in warned)
    for result in check_valid(case):
        assert result.SpecificCharacterSet == "ISO_IR 192"
        assert result.get_item("PatientName").value.rstrip(b" ") == name.encode("utf-8")
        assert str(result.PatientName) == name
        (other,) = result.OtherPatientIDsSequence  # written in UTF-8 too
        assert other.get_item("IssuerOfPatientID").value.rstrip(b" ") == issuer.encode()


def test_empty_character_set_is_left_out() -> None:
    source = pydicom.dcmread(sorted(CT_DIR.glob("*.dcm"))[0])
    source.SpecificCharacterSet = ""
    (header,) = source_headers([source])
    assert "SpecificCharacterSet" not in header
