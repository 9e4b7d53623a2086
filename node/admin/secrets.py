"""Hashed admin secrets: PBKDF2-HMAC-SHA256 with a random salt, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

SCHEME = "pbkdf2_sha256"
ITERATIONS = 200_000


def hash_secret(secret: str, *, iterations: int = ITERATIONS, salt: str | None = None) -> str:
    """``pbkdf2_sha256$ITERATIONS$SALT$HASH`` for ``secret`` (what the config stores)."""
    salt = salt or secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt.encode(), iterations)
    return f"{SCHEME}${iterations}${salt}${digest.hex()}"


def verify_secret(secret: str, encoded: str) -> bool:
    """True when ``secret`` matches ``encoded``; False for a wrong secret or a malformed hash."""
    try:
        scheme, iterations, salt, expected = encoded.split("$")
        rounds = int(iterations)
    except ValueError:
        return False
    if scheme != SCHEME or rounds < 1:
        return False
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt.encode(), rounds)
    return hmac.compare_digest(digest.hex(), expected)


def new_token() -> str:
    return secrets.token_urlsafe(32)
