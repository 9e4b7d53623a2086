"""Who may use the admin server, and protection of state-changing requests.

Bound to loopback without credentials configured, everyone local is ``local``.
With credentials (required when bound elsewhere): HTTP Basic (user and a hashed
password, what a browser prompts for) or ``Authorization: Bearer TOKEN`` (scripts,
Prometheus). Browsers send Basic credentials by themselves, so every POST made
that way (or anonymously on loopback) must also carry the ``X-CSRF-Token`` header
from ``GET /api/session`` and, when the browser sends one, a same-origin ``Origin``
naming an allowed host. A cross-site page can send neither.

Secrets are checked in constant time (the password hash is verified even for an
unknown user); headers verified once are remembered (:class:`VerifiedCache`), so a
session does not pay PBKDF2 per request. Wrong credentials are :class:`LoginFailed`
(logged and audited by the API); too many from one address lock it out
(:class:`LoginThrottled`) without checking what it sends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import secrets
import threading
import tomllib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, status

from node.admin.middleware import host_of
from node.admin.secrets import verify_secret
from node.errors import ConfigError, NodeError
from node.settings import LOOPBACK_HOSTS, AdminSettings

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


class AuthError(NodeError):
    """A request to the admin server was not authenticated."""


class Unauthenticated(AuthError):
    """The request carries no credentials (a browser's first request): 401, nothing logged."""


class LoginFailed(AuthError):
    """Wrong credentials: 401, logged, audited and counted against the address."""

    def __init__(self, address: str, username: str, locked: bool) -> None:
        super().__init__(f"failed login from {address} as {printable(username)}")
        self.address = address
        self.username = username
        self.locked = locked
        """This failure locked the address out."""


class LoginThrottled(AuthError):
    """Too many recent failures from the address: 429, credentials not checked."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins; retry in {math.ceil(retry_after)} s")
        self.retry_after = math.ceil(retry_after)


def printable(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters with control characters escaped, for a log line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text[:limit])


class VerifiedCache:
    """Authorization headers verified recently (keyed HMAC, never the header), bounded."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._key = secrets.token_bytes(32)
        self._names: dict[bytes, str] = {}
        self._lock = threading.Lock()

    def digest(self, header: str) -> bytes:
        return hmac.new(self._key, header.encode(), hashlib.sha256).digest()

    def get(self, digest: bytes) -> str | None:
        with self._lock:
            return self._names.get(digest)

    def add(self, digest: bytes, name: str) -> None:
        with self._lock:
            if len(self._names) >= self.size:
                self._names.pop(next(iter(self._names)))
            self._names[digest] = name


@dataclass
class _Failures:
    times: deque[datetime] = field(default_factory=deque)
    locked_until: datetime | None = None


class FailedLogins:
    """Per client address: ``limit`` failures within ``window`` lock it out for ``window``."""

    def __init__(self, limit: int, window: timedelta, addresses: int = 4096) -> None:
        self.limit = limit
        self.window = window
        self.addresses = addresses
        self._by_address: OrderedDict[str, _Failures] = OrderedDict()
        self._lock = threading.Lock()

    def locked(self, address: str, now: datetime) -> float | None:
        """Seconds the address stays locked out, or None."""
        with self._lock:
            entry = self._by_address.get(address)
            if entry is None or entry.locked_until is None or entry.locked_until <= now:
                return None
            return (entry.locked_until - now).total_seconds()

    def record(self, address: str, now: datetime) -> bool:
        """Count a failure; True when it locks the address out."""
        with self._lock:
            entry = self._by_address.pop(address, None) or _Failures()
            self._by_address[address] = entry  # most recent last
            while len(self._by_address) > self.addresses:
                self._by_address.popitem(last=False)
            while entry.times and entry.times[0] <= now - self.window:
                entry.times.popleft()
            entry.times.append(now)
            if len(entry.times) < self.limit:
                return False
            entry.times.clear()
            entry.locked_until = now + self.window
            return True


@dataclass
class Guard:
    credentials: Credentials
    hosts: frozenset[str] = frozenset(LOOPBACK_HOSTS)
    """Host names the server answers; a state-changing request's Origin must be one."""
    failures: FailedLogins = field(default_factory=lambda: FailedLogins(10, timedelta(seconds=60)))
    csrf_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    verified: VerifiedCache = field(default_factory=VerifiedCache)

    @classmethod
    def for_settings(cls, admin: AdminSettings) -> Guard:
        """The guard of ``admin``; raises ConfigError (see :func:`load_credentials`)."""
        return cls(load_credentials(admin), frozenset(admin.allowed_hosts),
                   FailedLogins(admin.max_failed_logins,
                                timedelta(seconds=admin.lockout_seconds)))

    def authenticate(self, request: Request, now: datetime) -> Principal:
        """The caller, or :class:`AuthError`: no, wrong or (locked out) unchecked credentials."""
        address = request.client.host if request.client else "unknown"
        if not self.credentials.configured:
            return Principal("local", address, ambient=True)
        header = request.headers.get("authorization", "")
        if not header:
            raise Unauthenticated("authentication required")
        wait = self.failures.locked(address, now)
        if wait is not None:
            raise LoginThrottled(wait)
        digest = self.verified.digest(header)
        name = self.verified.get(digest) or self._verify(header)
        if name is None:
            raise LoginFailed(address, _claimed(header), self.failures.record(address, now))
        self.verified.add(digest, name)
        return Principal(name, address, ambient=header.partition(" ")[0].lower() != "bearer")

    def _verify(self, header: str) -> str | None:
        """The name the credentials prove, or None; each check takes the same time."""
        scheme, _, value = header.partition(" ")
        creds = self.credentials
        if scheme.lower() == "bearer" and creds.token_hash:
            return "token" if verify_secret(value.strip(), creds.token_hash) else None
        if scheme.lower() == "basic" and creds.password_hash and creds.username is not None:
            user, password = _basic(value)
            # Compare digests (no length leak) and verify the password even for an unknown
            # user, so that the time taken does not tell which usernames exist.
            user_ok = hmac.compare_digest(_sha256(user or ""), _sha256(creds.username))
            password_ok = verify_secret(password, creds.password_hash)
            return user if user is not None and user_ok and password_ok else None
        return None

    def csrf_token(self, principal: Principal) -> str:
        return hmac.new(self.csrf_key, principal.name.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, request: Request, principal: Principal) -> None:
        """Refuse a state-changing request a cross-site page could have made."""
        if not principal.ambient:
            return
        origin = request.headers.get("origin")
        if origin and not self._same_origin(origin, request.headers.get("host", "")):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-origin request refused")
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), self.csrf_token(principal).encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"missing or wrong {CSRF_HEADER} header (GET /api/session)")

    def _same_origin(self, origin: str, host: str) -> bool:
        """Origin names the Host the request went to, and that is an allowed host."""
        netloc = urlsplit(origin).netloc
        return netloc == host and host_of(netloc) in self.hosts


def _claimed(header: str) -> str:
    """Who the credentials claim to be, for the log: a Basic user name, or the scheme."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        user, _password = _basic(value)
        return user if user is not None else "(malformed basic credentials)"
    return "(bearer token)" if scheme.lower() == "bearer" else f"({scheme} credentials)"


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _basic(value: str) -> tuple[str | None, str]:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, ""
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else (None, "")
