"""Connections that try to take the DICOM port or the node's memory with almost no traffic."""

from __future__ import annotations

import os
import socket
import struct
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from node.settings import DicomSettings
from tests.conftest import Factory
from tests.peers import CHEST_CT, echoscu, free_port, storescu
from tests.receiver import running_receiver

CHEST_CT_FIRST = sorted(CHEST_CT.glob("*.dcm"))[0]


@contextmanager
def node(tmp_path: Path, factory: Factory, **dicom: object) -> Iterator[int]:
    port = free_port()
    settings = DicomSettings(host="127.0.0.1", port=port, **dicom)  # type: ignore[arg-type]
    with running_receiver(tmp_path / "store", factory, settings):
        yield port


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the node closes (or aborts) this connection within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
            if data[:1] == b"\x07":  # A-ABORT, then the close
                continue
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_claimed_huge_pdu_is_refused_before_memory_is_committed(
        tmp_path: Path, factory: Factory) -> None:
    """Six bytes claiming a 1 GiB association request: aborted, nothing allocated for it."""
    with node(tmp_path, factory) as port:
        tracemalloc.start()
        try:
            with connect(port) as claim:
                claim.sendall(b"\x01\x00" + struct.pack(">L", 2**30))
                assert closed_by_peer(claim, 5)
                _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a 6-byte claim"
        with connect(port) as trickle:  # a P-DATA claim held open and trickled: same
            trickle.sendall(b"\x04\x00" + struct.pack(">L", 2**32 - 1))
            assert closed_by_peer(trickle, 5)
        assert echoscu(port) == 0


def test_slow_association_requests_do_not_hold_the_port(tmp_path: Path,
                                                        factory: Factory) -> None:
    """Every slot held by a peer trickling its request: each is closed at the request
    deadline, and a legitimate C-ECHO then gets through."""
    with node(tmp_path, factory, max_associations=3, association_request_timeout=2.0
              ) as port, ExitStack() as stack:
        slow = [stack.enter_context(connect(port)) for _ in range(3)]
        started = time.monotonic()
        for sock in slow:
            sock.sendall(b"\x01")  # one byte of a header, then silence (or more later)
        time.sleep(1.0)
        for sock in slow:
            sock.sendall(b"\x00")  # still trickling, well inside the network timeout
        assert all(closed_by_peer(sock, 5) for sock in slow)
        assert time.monotonic() - started < 5  # the request deadline, not the idle timeout
        assert echoscu(port) == 0


def test_connect_and_close_probes_free_their_slot_at_once(tmp_path: Path,
                                                          factory: Factory) -> None:
    """A health check that opens and closes a TCP connection must not hold a slot."""
    with node(tmp_path, factory, max_associations=2) as port:
        for _ in range(10):
            connect(port).close()
        time.sleep(0.5)
        assert echoscu(port) == 0


def test_connections_per_source_address_are_limited(tmp_path: Path, factory: Factory) -> None:
    with node(tmp_path, factory, max_associations_per_address=2,
              association_request_timeout=30.0) as port:
        with connect(port), connect(port):
            time.sleep(0.3)
            assert echoscu(port) != 0  # the third from 127.0.0.1
        time.sleep(0.5)
        assert echoscu(port) == 0  # once they are gone


def test_a_data_set_beyond_the_instance_limit_is_cut_off_while_it_arrives(
        tmp_path: Path, factory: Factory) -> None:
    """Fragments within dicom.max_pdu, but their data set passes dicom.max_instance_mb:
    the association is aborted while they arrive, not gathered whole and refused after."""
    big = pydicom.dcmread(CHEST_CT_FIRST)
    big.Rows, big.Columns = 4096, 4096  # 32 MiB of pixels
    big.PixelData = bytes(4096 * 4096 * 2)
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "big.dcm"
    big.save_as(path)
    port = free_port()
    settings = DicomSettings(host="127.0.0.1", port=port, max_pdu=65536)
    with running_receiver(tmp_path / "store", factory, settings, max_instance_mb=2):
        tracemalloc.start()
        try:
            out = storescu(port, path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert out.returncode != 0 or "Success" not in out.stderr
        assert peak < 12 * 2**20, f"{peak / 2**20:.0f} MiB held for a refused 32 MiB data set"
        assert echoscu(port) == 0


def test_associations_work_on_file_descriptors_above_1024(tmp_path: Path,
                                                          factory: Factory) -> None:
    """A node with many open files (LimitNOFILE=65536) gets sockets numbered past 1023,
    which ``select`` refuses: the receiver must still serve them."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        raise AssertionError(f"the hard limit of open files ({hard}) is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    spare = []
    try:
        while len(spare) < 1100:  # push the next descriptors past 1024
            spare.append(os.open(os.devnull, os.O_RDONLY))
        with node(tmp_path, factory) as port:
            assert echoscu(port) == 0
            assert storescu(port, CHEST_CT_FIRST).returncode == 0
    finally:
        for fd in spare:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
