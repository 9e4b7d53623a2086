"""TLS for DICOM (PS3.15 Annex B secure transport): the SSL contexts of the SCP and the sender.

Certificates, keys and CA bundles are PEM files named in the config. TLS 1.2 is
the minimum (BCP 195). A file that cannot be read or does not parse is a
:class:`ConfigError`, raised at start-up rather than on the first association.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from node.errors import ConfigError
from node.settings import DestinationTLS, TLSSettings


def _load(ctx: ssl.SSLContext, cert: Path | None, key: Path | None, ca: Path | None,
          what: str) -> None:
    try:
        if cert is not None:
            ctx.load_cert_chain(certfile=cert, keyfile=key)
        if ca is not None:
            ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: cannot load certificate, key or CA: {exc}") from exc


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The SCP's context: our certificate; client certificates checked against ``tls.ca``.

    With ``require_client_cert`` a client without a certificate signed by the CA
    is refused during the handshake; without it, a certificate the client
    presents is still verified, but none is needed.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, tls.cert, tls.key, tls.ca, "dicom.tls")
    if tls.require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(dest: DestinationTLS, own: TLSSettings) -> ssl.SSLContext:
    """The sender's context for one destination.

    The destination's certificate is verified against ``dest.ca`` (else the
    system's trust store), and its name against the destination host unless
    ``check_hostname`` is off. We present ``dest.cert``/``dest.key``, else the
    node's own ``dicom.tls`` certificate, when there is one.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = dest.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if dest.ca is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    cert, key = (dest.cert, dest.key) if dest.cert is not None else (own.cert, own.key)
    _load(ctx, cert, key, dest.ca, "destination tls")
    return ctx


def unreadable(files: Sequence[tuple[str, Path | None]]) -> list[str]:
    """A problem for each ``(key, path)`` whose path is set but not a readable file."""
    return [f"{key}: {path}: not a readable file" for key, path in files
            if path is not None and not (path.is_file() and os.access(path, os.R_OK))]
