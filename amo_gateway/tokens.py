"""Pure token logic: the records the vault holds and the arithmetic of expiry and refresh. No I/O here."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import random
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Status = Literal["connected", "reauth_required"]
CONNECTED: Status = "connected"
REAUTH_REQUIRED: Status = "reauth_required"


@dataclass(frozen=True)
class TokenPair:
    """One access/refresh pair as amoCRM issued it; `refresh_token` is None for a long-lived token."""

    access_token: str
    refresh_token: str | None
    expires_at: float
    obtained_at: float

    def __repr__(self) -> str:  # never show a token, even in a traceback
        return f"TokenPair(access={fingerprint(self.access_token)}, expires_at={self.expires_at:.0f})"

    @property
    def lifetime(self) -> float:
        return max(self.expires_at - self.obtained_at, 0.0)

    def expired(self, now: float, leeway: float = 30.0) -> bool:
        """True when the access token is gone, or will be within `leeway` seconds (at most a quarter of its life).

        The cap matters for short-lived tokens: with a leeway longer than the lifetime every caller would
        see a fresh token as expired and spend a refresh token on each request.
        """
        return now >= self.expires_at - min(leeway, self.lifetime / 4)


@dataclass(frozen=True)
class InFlight:
    """A refresh that was sent but whose answer is not yet stored: survives a crash so it can be judged."""

    refresh_fp: str
    started_at: float


@dataclass(frozen=True)
class Account:
    """Everything the vault keeps about one connected amoCRM account."""

    account_id: str
    base_url: str
    tokens: TokenPair | None = None
    status: Status = CONNECTED
    reason: str | None = None
    api_domain: str | None = None
    subdomain: str | None = None
    long_lived: bool = False
    refresh_obtained_at: float | None = None
    in_flight: InFlight | None = None
    last_error: str | None = None
    connected_at: float | None = None
    failing_since: float | None = None  # first transient refresh failure of the current run (alerts read it)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; a shallow copy per level, since asdict's deep copies dominate vault saves."""
        raw = dict(vars(self))
        raw["tokens"] = dict(vars(self.tokens)) if self.tokens else None
        raw["in_flight"] = dict(vars(self.in_flight)) if self.in_flight else None
        if raw["failing_since"] is None:
            del raw["failing_since"]  # absent unless failing: a vault an older version can still read
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Account:
        tokens = TokenPair(**raw["tokens"]) if raw.get("tokens") else None
        in_flight = InFlight(**raw["in_flight"]) if raw.get("in_flight") else None
        return cls(**{**raw, "tokens": tokens, "in_flight": in_flight})

    def with_pair(self, pair: TokenPair) -> Account:
        """This account holding a fresh pair: connected again, no refresh in flight."""
        return replace(
            self,
            tokens=pair,
            status=CONNECTED,
            reason=None,
            in_flight=None,
            last_error=None,
            failing_since=None,
            refresh_obtained_at=pair.obtained_at if pair.refresh_token else self.refresh_obtained_at,
        )

    def needing_reauth(self, reason: str) -> Account:
        return replace(self, status=REAUTH_REQUIRED, reason=reason, in_flight=None, last_error=reason,
                       failing_since=None)


@dataclass
class PendingState:
    """A `state` the gateway issued and will accept once on the callback."""

    # "console": issued for the operator console's consent popup, so the callback answers the popup with a page
    # (an older release reading it treats it as "authorize": the vault stays readable on a rollback)
    purpose: Literal["exchange", "authorize", "console"]
    created_at: float
    expires_at: float
    label: str | None = None
    login: str | None = None
    base_url: str | None = None


@dataclass
class VaultData:
    """The whole decrypted vault."""

    accounts: dict[str, Account] = field(default_factory=dict)
    states: dict[str, PendingState] = field(default_factory=dict)
    exchange_slots: dict[str, float] = field(default_factory=dict)
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "accounts": {k: a.to_dict() for k, a in self.accounts.items()},
            "states": {k: dict(vars(s)) for k, s in self.states.items()},
            "exchange_slots": dict(self.exchange_slots),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VaultData:
        return cls(
            accounts={k: Account.from_dict(v) for k, v in raw.get("accounts", {}).items()},
            states={k: PendingState(**v) for k, v in raw.get("states", {}).items()},
            exchange_slots={k: float(v) for k, v in raw.get("exchange_slots", {}).items()},
            version=int(raw.get("version", 1)),
        )

    def copy(self) -> VaultData:
        """A copy safe to mutate: fresh dicts; accounts are frozen and states are replaced, never edited."""
        return VaultData(dict(self.accounts), dict(self.states), dict(self.exchange_slots), self.version)

    def prune(self, now: float) -> None:
        """Drop expired states and spent exchange slots, so the vault does not grow without end."""
        self.states = {k: s for k, s in self.states.items() if s.expires_at > now}
        self.exchange_slots = {k: t for k, t in self.exchange_slots.items() if t > now}


def pair_from_response(body: dict[str, Any], now: float) -> TokenPair:
    """Build a TokenPair from amoCRM's token answer; reads `expires_in`, never assumes a day.

    The access token's own `exp` claim wins when it is earlier: a JWT counts whole seconds, so `exp` may fall
    up to a second before `now + expires_in` (more than the quarter-life leeway of a token of a few seconds).
    Never later: a gateway clock behind amoCRM's would otherwise stretch the token. An `exp` already past by
    this clock (one far ahead of amoCRM's) is ignored rather than making every fresh token look expired.
    """
    access = str(body["access_token"])
    expires_at = now + float(body["expires_in"])
    exp = decode_claims(access).get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool) and now < exp < expires_at:
        expires_at = float(exp)
    return TokenPair(
        access_token=access,
        refresh_token=str(body["refresh_token"]) if body.get("refresh_token") else None,
        expires_at=expires_at,
        obtained_at=now,
    )


def refresh_due_at(pair: TokenPair, margin: float) -> float:
    """When to refresh: `margin` seconds before expiry, or at half the lifetime when margin >= lifetime."""
    if margin >= pair.lifetime:
        return pair.obtained_at + pair.lifetime / 2
    return pair.expires_at - margin


def account_due_at(account: Account, margin: float) -> float | None:
    """When this account's pair should be refreshed, spread a little by account so storms thin out.

    None for an account that is never refreshed (long-lived, needing re-authorization, no pair).
    """
    pair = account.tokens
    if account.long_lived or account.status != CONNECTED or pair is None or pair.refresh_token is None:
        return None
    spread = min(margin, pair.lifetime / 2) * 0.1 * (zlib.crc32(account.account_id.encode()) % 1000) / 1000
    return refresh_due_at(pair, margin) - spread


def needs_refresh(account: Account, now: float, margin: float) -> bool:
    """True when this account's pair is refreshable and due."""
    due = account_due_at(account, margin)
    return due is not None and now >= due


def backoff_delay(attempt: int, *, base: float = 2.0, cap: float = 300.0, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
    return rng.uniform(0, min(cap, base * 2**attempt))


def fingerprint(secret: str | None) -> str:
    """A short, one-way tag of a secret for logs and comparisons; never reversible to the secret."""
    if not secret:
        return "-"
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def keyed_digest(key: bytes, value: str) -> str:
    """HMAC-SHA256 of `value`: how vault keys and the audit trail name secrets without holding them."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def decode_claims(access_token: str) -> dict[str, Any]:
    """The JWT's claims, decoded WITHOUT verification (RS256; the client secret cannot verify it)."""
    parts = access_token.split(".")
    if len(parts) != 3:
        return {}
    padded = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (binascii.Error, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}
