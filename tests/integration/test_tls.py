"""DICOM TLS against real dcmtk peers: storescu ``+tls`` into the node, the node sending
to storescp ``+tls``; plain and untrusted clients are refused.

A throw-away CA, server and client certificates are made with ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import gc
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.queue import ResultSpec, claim_job, complete_job, record_instance
from db.schema import Result, ResultStatus
from node.dimse import VERIFICATION
from node.errors import ConfigError
from node.send.sender import echo, send_due
from node.settings import (
    DestinationTLS,
    DicomSettings,
    Settings,
    TLSSettings,
    parse_settings,
)
from node.tls import client_context, server_context
from tests.conftest import T0, Factory, dispatch, meta
from tests.peers import (
    CHEST_CT,
    SAMPLES,
    dcmtk_env,
    echoscu,
    free_port,
    port_open,
    start_node,
    stop_process,
    storescu,
    wait_until,
    write_config,
)
from tests.receiver import running_receiver, settled_count

CT = sorted(CHEST_CT.glob("*.dcm"))
SR_FILE = SAMPLES / "reference-seg-sr" / "sr_document_TID1500_highdicom.dcm"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    """A client certificate from another CA (self-signed)."""
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write(folder: Path, stem: str, cert: x509.Certificate, key: rsa.RSAPrivateKey
           ) -> tuple[Path, Path]:
    crt, pem = folder / f"{stem}.crt", folder / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()))
    pem.chmod(0o600)
    return crt, pem


def _issue(subject: str, key: rsa.RSAPrivateKey, issuer: x509.Name, issuer_key: rsa.RSAPrivateKey,
           *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca_cert = _issue("ainode test CA", ca_key, _name("ainode test CA"), ca_key, ca=True)
    ca, _ = _write(folder, "ca", ca_cert, ca_key)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    server = _write(folder, "server", _issue("localhost", server_key, ca_cert.subject, ca_key,
                                             server=True), server_key)
    client = _write(folder, "client", _issue("STORESCU", client_key, ca_cert.subject, ca_key),
                    client_key)
    rogue = _write(folder, "rogue", _issue("ROGUE", rogue_key, _name("ROGUE"), rogue_key),
                   rogue_key)
    return Pki(ca, *server, *client, *rogue)


def tls_settings(pki: Pki, *, require_client_cert: bool = True) -> TLSSettings:
    return TLSSettings(enabled=True, cert=pki.server_cert, key=pki.server_key, ca=pki.ca,
                       require_client_cert=require_client_cert)


@pytest.fixture
def tls_scp(tmp_path: Path, factory: Factory, pki: Pki
            ) -> Iterator[tuple[int, ThreadedAssociationServer]]:
    port = free_port()
    dicom = DicomSettings(host="127.0.0.1", port=port, tls=tls_settings(pki))
    with running_receiver(tmp_path / "store", factory, dicom) as server:
        yield port, server


def count(factory: Factory) -> int:
    return settled_count(factory)


def tls_options(cert: Path, key: Path, ca: Path) -> tuple[str, ...]:
    return ("+tls", str(key), str(cert), "+cf", str(ca))


def test_storescu_over_tls_with_client_certificate_is_stored(
        tls_scp: tuple[int, ThreadedAssociationServer], factory: Factory, pki: Pki) -> None:
    port, _ = tls_scp
    out = storescu(port, CT[:3], extra=tls_options(pki.client_cert, pki.client_key, pki.ca))
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("Received Store Response (Success)") == 3
    assert count(factory) == 3


# pynetdicom leaves the sockets of failed TLS handshakes to the garbage collector: the
# server's accept loop (AssociationServer.get_request) drops the socket when wrap_socket
# raises, and the client's AssociationSocket._shutdown_socket skips close() when shutdown()
# raises. Collect them inside the test that caused them, once the server thread is done.
UNCLOSED_CLIENT_SOCKET = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def collect_dropped_sockets() -> None:
    time.sleep(0.2)  # let the server's accept loop finish the failed handshake
    for thread in threading.enumerate():
        if isinstance(thread, Association):  # a client association still winding down
            thread.join(10)
    gc.collect()


@UNCLOSED_CLIENT_SOCKET
def test_plain_and_untrusted_clients_are_refused(
        tls_scp: tuple[int, ThreadedAssociationServer], factory: Factory, pki: Pki) -> None:
    port, server = tls_scp
    assert echoscu(port) != 0  # plain TCP: the handshake fails, no association
    plain = storescu(port, CT[0])
    assert "Store Response (Success)" not in plain.stderr
    rogue = storescu(port, CT[0], extra=tls_options(pki.rogue_cert, pki.rogue_key, pki.ca))
    assert rogue.returncode != 0 and "Store Response (Success)" not in rogue.stderr
    assert count(factory) == 0
    # A client that trusts the node but has no certificate is refused when one is required.
    assert not _pynetdicom_echo(port, pki, with_cert=False)
    collect_dropped_sockets()
    # ... and the server keeps serving trusted clients.
    assert _pynetdicom_echo(port, pki, with_cert=True)
    assert server.socket is not None and server.socket.fileno() != -1


def _pynetdicom_echo(port: int, pki: Pki, *, with_cert: bool) -> bool:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if with_cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE", tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


@UNCLOSED_CLIENT_SOCKET
def test_client_certificate_optional_when_not_required(tmp_path: Path, factory: Factory,
                                                       pki: Pki) -> None:
    port = free_port()
    dicom = DicomSettings(host="127.0.0.1", port=port,
                          tls=tls_settings(pki, require_client_cert=False))
    with running_receiver(tmp_path / "s", factory, dicom):
        assert _pynetdicom_echo(port, pki, with_cert=False)
        assert echoscu(port) != 0  # still TLS only
        collect_dropped_sockets()


# --- sending over TLS -----------------------------------------------------------------


def start_tls_storescp(out: Path, port: int, pki: Pki) -> subprocess.Popen[bytes]:
    """dcmtk storescp with TLS; by default it requires and verifies a client certificate."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", "PACS", "+xa", "+tls", str(pki.server_key),
                             str(pki.server_cert), "+cf", str(pki.ca), "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env())
    wait_until(lambda: port_open(port), 10, what="storescp")
    return proc


def outbox_with_one_result(factory: Factory, storage: Path) -> str:
    """A queued SR result for destination ``pacs``; return its SOP Instance UID."""
    (storage / "results").mkdir(parents=True)
    shutil.copy(SR_FILE, storage / "results" / "sr.dcm")
    ds = pydicom.dcmread(SR_FILE, stop_before_pixels=True)
    record_instance(factory, meta("1.9.1"), T0)
    dispatch(factory, T0 + dt.timedelta(seconds=61))
    job = claim_job(factory, "w", T0, 60)
    assert job is not None
    assert complete_job(factory, job.id, "w", T0, [ResultSpec(
        "SR", str(ds.SOPClassUID), str(ds.SOPInstanceUID), "results/sr.dcm")], 0.1)
    return str(ds.SOPInstanceUID)


def node_settings(storage: Path, pacs_port: int, pki: Pki, *, tls: bool) -> Settings:
    dest_tls = f'tls = {{ enabled = true, ca = "{pki.ca}" }}' if tls else ""
    return parse_settings(f"""
[dicom]
ae_title = "AINODE"
tls = {{ enabled = true, cert = "{pki.client_cert}", key = "{pki.client_key}", ca = "{pki.ca}" }}
[storage]
dir = "{storage}"
[send]
timeout_seconds = 10
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
{dest_tls}
""")


@UNCLOSED_CLIENT_SOCKET
def test_node_sends_results_to_storescp_over_tls(tmp_path: Path, factory: Factory,
                                                 pki: Pki) -> None:
    storage, received = tmp_path / "var", tmp_path / "pacs"
    sop_uid = outbox_with_one_result(factory, storage)
    port = free_port()
    pacs = start_tls_storescp(received, port, pki)
    try:
        # Without TLS the destination refuses us: the result stays queued for a retry.
        plain = node_settings(storage, port, pki, tls=False)
        assert send_due(plain, factory, lambda: T0) == 0
        with factory() as s:
            row = s.scalars(select(Result)).one()
            assert row.status is ResultStatus.PENDING and row.attempts == 1
            retry_at = row.next_attempt_at
        assert not list(received.iterdir())
        collect_dropped_sockets()
        settings = node_settings(storage, port, pki, tls=True)
        assert echo(settings.destination("pacs"), "AINODE", own_tls=settings.dicom.tls).ok
        assert send_due(settings, factory, lambda: retry_at) == 1
        (got,) = list(received.iterdir())
        assert str(pydicom.dcmread(got).SOPInstanceUID) == sop_uid
        with factory() as s:
            assert s.scalars(select(Result)).one().status is ResultStatus.SENT
    finally:
        stop_process(pacs)


def test_bad_tls_files_are_config_errors(tmp_path: Path, pki: Pki) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"dicom\.tls"):
        server_context(TLSSettings(enabled=True, cert=bad, key=pki.server_key))
    with pytest.raises(ConfigError, match="destination tls"):
        client_context(DestinationTLS(enabled=True, ca=tmp_path / "missing.pem"), TLSSettings())
    with pytest.raises(ConfigError, match="TLS needs cert and key"):
        parse_settings("[dicom.tls]\nenabled = true\n")
    with pytest.raises(ConfigError, match="require_client_cert needs ca"):
        parse_settings(f'[dicom.tls]\nenabled = true\ncert = "{pki.server_cert}"\n'
                       f'key = "{pki.server_key}"\nrequire_client_cert = true\n')



@UNCLOSED_CLIENT_SOCKET
def test_silent_client_does_not_block_the_tls_port(
        tls_scp: tuple[int, ThreadedAssociationServer], factory: Factory, pki: Pki) -> None:
    port, _ = tls_scp
    with socket.create_connection(("127.0.0.1", port), timeout=5):  # connects, says nothing
        time.sleep(0.3)
        out = storescu(port, CT[:1], extra=tls_options(pki.client_cert, pki.client_key, pki.ca))
        assert out.stderr.count("Received Store Response (Success)") == 1, out.stderr
    assert count(factory) == 1
    collect_dropped_sockets()


def test_tls_through_acceptor_processes(tmp_path: Path, pki: Pki) -> None:
    """With dicom.acceptors > 1 the handshake happens in the acceptor the connection went to."""
    port = free_port()
    config = write_config(tmp_path / "ainode.toml", port=port, storage=tmp_path / "var",
                          workers=0, stable_seconds=3600,
                          extra=(f'[dicom.tls]\nenabled = true\ncert = "{pki.server_cert}"\n'
                                 f'key = "{pki.server_key}"\nca = "{pki.ca}"\n'
                                 "require_client_cert = true\n"))
    config.write_text(config.read_text().replace(f"port = {port}\n",
                                                 f"port = {port}\nacceptors = 2\n", 1))
    node = start_node(config, port, tmp_path / "node.log")
    try:
        for files in (CT[:2], CT[2:4]):  # two associations: both acceptors, most likely
            out = storescu(port, files,
                           extra=tls_options(pki.client_cert, pki.client_key, pki.ca))
            assert out.returncode == 0, out.stderr
        assert storescu(port, CT[4]).returncode != 0  # plain TCP on the TLS port
        engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'ainode.db'}")
        factory = make_session_factory(engine)
        wait_until(lambda: count(factory) == 4, 20, what="4 instances over TLS")
        engine.dispose()
    finally:
        node.stop()
