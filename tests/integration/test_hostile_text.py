"""Text from the network in the node's log: one record stays one line, raw bytes are escaped.

A UID, an AE title or an exception message may hold a line break (forging a log
line that looks like the node's own) or a NUL or an escape sequence (raw in the
journal or the terminal). The node's log formatter escapes them.
"""

from __future__ import annotations

import io
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from node.runtime.logs import QUIET_LOGGERS, configure
from node.settings import DicomSettings
from tests.conftest import Factory
from tests.peers import CHEST_CT, free_port
from tests.receiver import running_receiver

FORGED = "1.2.3\nFAKE LINE"


@pytest.fixture
def node_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The log as ``ainode serve`` configures it, written to a buffer instead of stderr."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure("INFO")
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


def test_a_record_is_one_line_with_escapes(node_log: io.StringIO) -> None:
    log = logging.getLogger("ainode.scp")
    log.warning("store rejected sop=%s from %s", FORGED, "MOD\x00\x1b[2J")
    log.info("raw %s\r\x7f\x85\u2028", "\t")
    (first, second) = node_log.getvalue().splitlines()
    assert first.endswith(r"store rejected sop=1.2.3\nFAKE LINE from MOD\x00\x1b[2J")
    assert " WARNING ainode.scp[" in first
    assert second.endswith(r"raw \t\r\x7f\x85\u2028")


def test_a_traceback_stays_in_its_record(node_log: io.StringIO) -> None:
    log = logging.getLogger("ainode.worker")
    try:
        raise ValueError(FORGED)
    except ValueError:
        log.exception("job 7 failed")
    (line,) = node_log.getvalue().splitlines()
    assert line.endswith(r"ValueError: 1.2.3\nFAKE LINE")
    assert r"job 7 failed\nTraceback (most recent call last):\n" in line


def test_a_forged_sop_instance_uid_forges_no_log_line(
        node_log: io.StringIO, tmp_path: Path, factory: Factory) -> None:
    port = free_port()
    source = pydicom.dcmread(sorted(CHEST_CT.glob("*.dcm"))[0])
    with warnings.catch_warnings():  # pydicom and pynetdicom warn about the invalid UID
        warnings.simplefilter("ignore")
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = FORGED
    with running_receiver(tmp_path / "store", factory,
                          DicomSettings(ae_title="AINODE", host="127.0.0.1", port=port)):
        ae = AE(ae_title="FORGER")
        ae.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_established
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                status = assoc.send_c_store(source)
        finally:
            assoc.release()
    assert status.Status == 0xC210  # cannot understand: not a valid UID
    lines = node_log.getvalue().splitlines()
    assert not [line for line in lines if line.startswith("FAKE LINE")]
    assert any(line.endswith(r"store rejected sop=1.2.3\nFAKE LINE from FORGER: SOP Instance "
                             "UID is missing or not a valid UID (status 0xC210)")
               for line in lines)
