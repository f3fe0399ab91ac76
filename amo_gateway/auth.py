"""Bearer tokens of the gateway's own callers: the operator and named consumers (internal services)."""

from __future__ import annotations

import hmac

from aiohttp import web

from amo_gateway.errors import ConfigError, Unauthorized
from amo_gateway.settings import Settings

OPERATOR = "operator"


class Authenticator:
    """Checks `Authorization: Bearer …` in constant time; knows callers by name, never logs a token."""

    def __init__(self, admin_token: str | None, consumers: dict[str, str]) -> None:
        self._admin = admin_token.encode() if admin_token else None  # encoded once, compared on every request
        self._consumers = {name: token.encode() for name, token in consumers.items()}

    def __repr__(self) -> str:
        return f"Authenticator(consumers={sorted(self._consumers)})"

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        return cls(settings.secret("admin_token"), parse_consumers(settings.secret("consumer_tokens") or ""))

    def operator(self, request: web.Request) -> str:
        """Admit the operator only; raise Unauthorized otherwise."""
        presented = _bearer(request)
        if presented is not None and self._admin and hmac.compare_digest(presented, self._admin):
            return OPERATOR
        raise Unauthorized("this endpoint needs the operator's bearer token (AMO_ADMIN_TOKEN)")

    def consumer_or_operator(self, request: web.Request) -> str:
        """Admit the operator or any consumer; return the caller's name for logs and the audit trail."""
        presented = _bearer(request)
        if presented is not None:
            if self._admin and hmac.compare_digest(presented, self._admin):
                return OPERATOR
            for name, token in self._consumers.items():
                if hmac.compare_digest(presented, token):
                    return name
        raise Unauthorized("a valid bearer token is required (the operator's or a consumer's)")

    def optional(self, request: web.Request) -> str | None:
        """None for a caller who sends no Authorization header; otherwise as consumer_or_operator (a wrong
        bearer is refused, not quietly treated as anonymous, so a typo shows up at once)."""
        if "Authorization" not in request.headers:
            return None
        return self.consumer_or_operator(request)


def parse_consumers(text: str) -> dict[str, str]:
    """`name:token` pairs separated by commas or newlines."""
    consumers: dict[str, str] = {}
    for item in text.replace("\n", ",").split(","):
        if not item.strip():
            continue
        name, sep, token = item.strip().partition(":")
        if not sep or not name or not token:
            raise ConfigError("AMO_CONSUMER_TOKENS entries must be name:token (one entry has no name or token)")
        consumers[name] = token
    return consumers


def _bearer(request: web.Request) -> bytes | None:
    """The presented bearer token, encoded for hmac.compare_digest (which wants bytes for non-ASCII text)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    return value.encode() if scheme.lower() == "bearer" and value else None
