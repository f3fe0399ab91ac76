"""Pure token arithmetic (tokens.py): no I/O, no clock but the one passed in."""

from __future__ import annotations

import base64
import json
import random

from amo_gateway.tokens import (
    Account,
    TokenPair,
    VaultData,
    account_due_at,
    backoff_delay,
    decode_claims,
    needs_refresh,
    pair_from_response,
    refresh_due_at,
)


def _pair(obtained: float = 1000.0, lifetime: float = 86400.0) -> TokenPair:
    return TokenPair("a.b.c", "refresh", obtained + lifetime, obtained)


def test_refresh_is_due_margin_seconds_before_expiry() -> None:
    """A day-long token with a one-hour margin is due 23 hours after it was obtained."""
    assert refresh_due_at(_pair(), 3600) == 1000 + 86400 - 3600


def test_margin_at_or_above_lifetime_refreshes_at_half_life() -> None:
    """Contract note 6: a margin that swallows the lifetime falls back to half the lifetime."""
    assert refresh_due_at(_pair(lifetime=10), 10) == 1005
    assert refresh_due_at(_pair(lifetime=10), 3600) == 1005


def test_pair_reads_expires_in_instead_of_assuming_a_day() -> None:
    """expires_in from amoCRM's answer decides the expiry."""
    pair = pair_from_response({"access_token": "x", "refresh_token": "y", "expires_in": 120}, now=50)
    assert (pair.expires_at, pair.obtained_at) == (170, 50)


def _jwt(exp: object) -> str:
    claims = base64.urlsafe_b64encode(json.dumps({"exp": exp, "account_id": 1}).encode()).decode().rstrip("=")
    return f"eyJ0eXAiOiJKV1QifQ.{claims}.c2ln"


def test_pair_takes_the_tokens_own_exp_when_it_is_earlier_than_expires_in() -> None:
    """amoCRM's JWT `exp` counts whole seconds: issued at 1000.8 for 3 s it dies at 1003, not 1003.8 - and a
    token of a few seconds must not be used past that (its quarter-life leeway is shorter than the rounding)."""
    now = 1000.8
    pair = pair_from_response({"access_token": _jwt(1003), "refresh_token": "y", "expires_in": 3}, now=now)
    assert pair.expires_at == 1003 and pair.expired(1003, leeway=0) and not pair.expired(1002.9, leeway=0)
    assert pair.expired(1002.5)  # let go a quarter-life early, before 1003 (expires_in alone: used until 1003.05)
    later = pair_from_response({"access_token": _jwt(1010), "refresh_token": "y", "expires_in": 3}, now=now)
    assert later.expires_at == now + 3  # never later than expires_in (a clock behind amoCRM's)
    for odd in (1000, 999.5, "1003", True, None):  # past by this clock, or not a number: expires_in decides
        assert pair_from_response({"access_token": _jwt(odd), "expires_in": 3}, now=now).expires_at == now + 3


def test_spread_moves_due_times_earlier_never_later() -> None:
    """Per-account jitter thins refresh storms but never lets a token expire first."""
    dues = {account_due_at(Account(str(i), "https://x", _pair()), 3600) for i in range(50)}
    plain = refresh_due_at(_pair(), 3600)
    assert len(dues) > 40
    assert all(d is not None and plain - 360 <= d <= plain for d in dues)


def test_long_lived_and_reauth_accounts_are_never_due() -> None:
    """Nothing to refresh for a long-lived token or a dead pair."""
    late = 10**9
    assert not needs_refresh(Account("1", "https://x", _pair(), long_lived=True), late, 60)
    assert not needs_refresh(Account("1", "https://x", _pair()).needing_reauth("gone"), late, 60)
    assert needs_refresh(Account("1", "https://x", _pair()), late, 60)


def test_backoff_grows_and_is_capped() -> None:
    """Full jitter within min(cap, base * 2**attempt)."""
    rng = random.Random(1)
    assert all(0 <= backoff_delay(0, rng=rng) <= 2 for _ in range(100))
    assert all(0 <= backoff_delay(30, rng=rng, cap=300) <= 300 for _ in range(100))
    assert max(backoff_delay(5, rng=rng) for _ in range(200)) > 32


def test_claims_are_decoded_without_verification_and_garbage_gives_nothing() -> None:
    """account_id and api_domain come from the JWT's middle part; anything malformed yields {}."""
    claims = base64.urlsafe_b64encode(json.dumps({"account_id": 7, "api_domain": "api-b.amocrm.ru"}).encode())
    token = "e30." + claims.decode().rstrip("=") + ".sig"
    assert decode_claims(token)["account_id"] == 7
    assert decode_claims("not-a-jwt") == {}
    assert decode_claims("a.!!!.c") == {}


def test_token_pair_repr_never_shows_a_token() -> None:
    """repr() (and so tracebacks) shows a fingerprint, not the secret."""
    pair = TokenPair("secret-access-token", "secret-refresh-token", 10, 0)
    assert "secret" not in repr(pair)


def test_vault_data_round_trips_and_prunes_expired_entries() -> None:
    """to_dict/from_dict is lossless; prune drops only what has expired."""
    data = VaultData(accounts={"1": Account("1", "https://x", _pair())})
    data.exchange_slots = {"old": 5.0, "new": 50.0}
    again = VaultData.from_dict(json.loads(json.dumps(data.to_dict())))
    assert again == data
    again.prune(now=10)
    assert again.exchange_slots == {"new": 50.0}
