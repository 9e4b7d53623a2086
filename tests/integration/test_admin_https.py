"""The admin server over HTTPS (``admin.tls_cert``/``admin.tls_key``): a real uvicorn
server started as ``ainode serve`` starts it; the start-up checks of its files; the
warning for credentials sent in clear.

The certificates come from the DICOM TLS tests' throw-away CA.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from node.admin.server import AdminServer, clear_text_warning, start_admin
from node.errors import ConfigError
from node.runtime.startup import startup_problems
from node.settings import Settings
from tests.conftest import Factory
from tests.integration.test_admin_api import settings_for
from tests.integration.test_tls import Pki, pki  # noqa: F401  (pki: the fixture)
from tests.peers import free_port


def tls_admin(pki: Pki, port: int, extra: str = "") -> str:  # noqa: F811
    return (f'port = {port}\ntls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
            f"{extra}")


def admin_problems(settings: Settings) -> list[str]:
    return [p for p in startup_problems(settings) if "admin" in p]


@pytest.fixture
def https_admin(tmp_path: Path, factory: Factory, pki: Pki  # noqa: F811
                ) -> Iterator[tuple[AdminServer, int]]:
    port = free_port()
    server = start_admin(settings_for(tmp_path, tls_admin(pki, port)), factory)
    assert server is not None
    try:
        yield server, port
    finally:
        server.stop()


def test_https_only_with_certificate_and_key(https_admin: tuple[AdminServer, int],
                                             pki: Pki) -> None:  # noqa: F811
    server, port = https_admin
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    reply = httpx2.get(f"https://localhost:{port}/healthz", verify=trusting, timeout=10)
    assert reply.status_code == 200 and reply.json()["status"] == "ok"
    assert server.scheme == "https"

    with pytest.raises(httpx2.TransportError):  # plain HTTP gets no HTTP answer
        httpx2.get(f"http://localhost:{port}/healthz", timeout=10)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        assert not sock.recv(4096).startswith(b"HTTP/")

    with pytest.raises(httpx2.ConnectError):  # nor does a client that does not trust it
        httpx2.get(f"https://localhost:{port}/healthz", timeout=10)

    context = server.server.config.ssl  # TLS 1.2 at least (clients refuse older ones too)
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2

def test_startup_checks_load_the_admin_certificate(tmp_path: Path, pki: Pki  # noqa: F811
                                                   ) -> None:
    port = free_port()
    assert admin_problems(settings_for(tmp_path, tls_admin(pki, port))) == []

    missing = settings_for(tmp_path, f'tls_cert = "{tmp_path / "none.crt"}"\n'
                                     f'tls_key = "{pki.server_key}"\n')
    assert admin_problems(missing) == [f"admin.tls_cert: {tmp_path / 'none.crt'}: "
                                       "not a readable file"]

    mismatched = settings_for(tmp_path, f'tls_cert = "{pki.server_cert}"\n'
                                        f'tls_key = "{pki.client_key}"\n')
    (problem,) = admin_problems(mismatched)
    assert problem.startswith("admin.tls_cert, admin.tls_key: cannot load")

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    unreadable = settings_for(tmp_path, f'tls_cert = "{garbage}"\ntls_key = "{garbage}"\n')
    (problem,) = admin_problems(unreadable)
    assert problem.startswith("admin.tls_cert, admin.tls_key: cannot load")

    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        settings_for(tmp_path, f'tls_cert = "{pki.server_cert}"\n')


def test_clear_text_credentials_are_warned_about_off_loopback(tmp_path: Path,
                                                              pki: Pki) -> None:  # noqa: F811
    creds = 'token_hash = "pbkdf2_sha256$1000$c2FsdA$aGFzaA"\n'
    exposed = settings_for(tmp_path, f'host = "0.0.0.0"\n{creds}').admin
    warning = clear_text_warning(exposed)
    assert warning is not None and "in clear" in warning and "admin.tls_cert" in warning
    encrypted = settings_for(tmp_path, f'host = "0.0.0.0"\n{creds}'
                                       f'{tls_admin(pki, free_port())}').admin
    assert clear_text_warning(encrypted) is None
    assert clear_text_warning(settings_for(tmp_path).admin) is None  # loopback
