"""Who may use the admin server, and protection of state-changing requests.

Bound to loopback without credentials configured, everyone local is ``local``.
With credentials (required when bound elsewhere): HTTP Basic (user and a hashed
password, what a browser prompts for) or ``Authorization: Bearer TOKEN`` (scripts,
Prometheus). Browsers send Basic credentials by themselves, so every POST made
that way (or anonymously on loopback) must also carry the ``X-CSRF-Token`` header
from ``GET /api/session`` and, when the browser sends one, a same-origin ``Origin``.
A cross-site page can send neither.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
import tomllib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, status

from node.admin.secrets import verify_secret
from node.errors import ConfigError
from node.settings import AdminSettings

CSRF_HEADER = "X-CSRF-Token"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password_hash: str | None = None
    token_hash: str | None = None

    @property
    def configured(self) -> bool:
        return self.password_hash is not None or self.token_hash is not None


def load_credentials(admin: AdminSettings) -> Credentials:
    """Credentials from the settings, overridden by ``credentials_file``; checks the binding."""
    values: dict[str, str | None] = {"username": admin.username,
                                     "password_hash": admin.password_hash,
                                     "token_hash": admin.token_hash}
    if admin.credentials_file is not None:
        try:
            data = tomllib.loads(admin.credentials_file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"admin.credentials_file {admin.credentials_file}: {exc}") from exc
        unknown = set(data) - set(values)
        if unknown:
            raise ConfigError(f"admin.credentials_file: unknown key(s) {sorted(unknown)}")
        values.update({k: str(v) for k, v in data.items()})
    creds = Credentials(**values)
    if (creds.username is None) != (creds.password_hash is None):
        raise ConfigError("admin: username and password_hash go together")
    if not creds.configured and not is_loopback(admin.host):
        raise ConfigError(f"admin.host {admin.host!r} is not loopback: configure "
                          "admin.password_hash or admin.token_hash (see ainode hash-secret)")
    return creds


@dataclass(frozen=True)
class Principal:
    """The caller. ``ambient``: its credentials are sent by the browser on its own."""

    name: str
    address: str
    ambient: bool

    @property
    def actor(self) -> str:
        return f"{self.name}@{self.address}"


@dataclass(frozen=True)
class Guard:
    credentials: Credentials
    csrf_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def authenticate(self, request: Request) -> Principal:
        address = request.client.host if request.client else "unknown"
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        creds = self.credentials
        if not creds.configured:
            return Principal("local", address, ambient=True)
        if scheme.lower() == "bearer" and creds.token_hash and value:
            if verify_secret(value.strip(), creds.token_hash):
                return Principal("token", address, ambient=False)
        elif scheme.lower() == "basic" and creds.password_hash and value:
            user, password = _basic(value)
            if (user is not None and creds.username is not None
                    and hmac.compare_digest(user.encode(), creds.username.encode())
                    and verify_secret(password, creds.password_hash)):
                return Principal(user, address, ambient=True)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "authentication required",
                            headers={"WWW-Authenticate": 'Basic realm="ainode", charset="UTF-8"'})

    def csrf_token(self, principal: Principal) -> str:
        return hmac.new(self.csrf_key, principal.name.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, request: Request, principal: Principal) -> None:
        """Refuse a state-changing request a cross-site page could have made."""
        if not principal.ambient:
            return
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host", ""):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-origin request refused")
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), self.csrf_token(principal).encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"missing or wrong {CSRF_HEADER} header (GET /api/session)")


def _basic(value: str) -> tuple[str | None, str]:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, ""
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else (None, "")
