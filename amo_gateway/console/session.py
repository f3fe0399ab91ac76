"""The console's signed session cookie and its CSRF tokens: pure functions over one HMAC key.

The key is derived one-way from the primary vault key and the operator token. Every process that opens the
same vault derives the same key, so a session made by one process is honoured by the others; rotating the
vault key or AMO_ADMIN_TOKEN ends every session at once. Nothing is stored server-side: a cookie is
`v1.<expires>.<session id>.<signature>`, and a CSRF token is an HMAC of the session id (synchronizer token).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

_KEY_LABEL = b"amo-gateway/console/v1\x00"
_VERSION = "v1"


@dataclass(frozen=True)
class Session:
    """A verified console session: its id (CSRF tokens hang on it) and when it ends."""

    sid: str
    expires_at: int


def session_key(vault_key: str, admin_token: str) -> bytes:
    """The cookie key: HMAC of the operator token's digest under the primary vault key."""
    material = _KEY_LABEL + hashlib.sha256(admin_token.encode()).digest()
    return hmac.new(vault_key.encode(), material, hashlib.sha256).digest()


def issue(key: bytes, now: float, ttl: float) -> str:
    """A fresh cookie value for a session of `ttl` seconds."""
    body = f"{_VERSION}.{int(now + ttl)}.{secrets.token_urlsafe(18)}"
    return f"{body}.{_sign(key, 'session', body)}"


def verify(key: bytes, value: str | None, now: float) -> Session | None:
    """The session a cookie value proves, or None when it is absent, forged, malformed or expired."""
    if not value or len(value) > 256:
        return None
    body, _, signature = value.rpartition(".")
    if not hmac.compare_digest(signature.encode(), _sign(key, "session", body).encode()):
        return None
    version, expires, sid = [*body.split("."), "", "", ""][:3]
    if version != _VERSION or not expires.isdigit() or int(expires) <= now or not sid:
        return None
    return Session(sid, int(expires))


def csrf_token(key: bytes, sid: str) -> str:
    """The CSRF token of a session (or of a login nonce): forms carry it, the cookie cannot."""
    return _sign(key, "csrf", sid)


def csrf_ok(key: bytes, sid: str, presented: str | None) -> bool:
    """True when `presented` is the token of `sid`, compared in constant time."""
    return bool(presented) and hmac.compare_digest(str(presented).encode(), csrf_token(key, sid).encode())


def constant_equal(presented: str, expected: str) -> bool:
    """Compare a presented secret with the expected one in constant time; an empty expected never matches."""
    return bool(expected) and hmac.compare_digest(presented.encode(), expected.encode())


def new_nonce() -> str:
    """A random value for the pre-login cookie (so even the login form carries a CSRF token)."""
    return secrets.token_urlsafe(18)


def _sign(key: bytes, purpose: str, body: str) -> str:
    mac = hmac.new(key, f"{purpose}\x00{body}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")
