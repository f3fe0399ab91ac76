"""Who may call what (auth.py), header by header: tests the mutation gate asked for."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from amo_gateway.auth import OPERATOR, Authenticator, parse_consumers
from amo_gateway.errors import ConfigError, Unauthorized
from amo_gateway.settings import Settings

ADMIN = "operator-secret"
CONSUMERS = {"crm-sync": "consumer-secret-1", "reports": "consumer-secret-2"}


def request(authorization: str | None) -> object:
    """A request carrying this Authorization header (or none)."""
    headers = {"Authorization": authorization} if authorization is not None else {}
    return make_mocked_request("GET", "/amo/token", headers=headers)


@pytest.mark.parametrize("header", ["Bearer operator-secret", "bearer operator-secret", "BEARER   operator-secret  "])
def test_operator_bearer_is_read_case_insensitively_and_trimmed(header: str) -> None:
    """The scheme is case-insensitive and blanks around the token do not matter, for both kinds of endpoint."""
    auth = Authenticator(ADMIN, CONSUMERS)
    assert auth.operator(request(header)) == OPERATOR  # type: ignore[arg-type]
    assert auth.consumer_or_operator(request(header)) == OPERATOR  # type: ignore[arg-type]


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Bearer    ", "Basic operator-secret",
                                    "operator-secret", "Bearer operator-secret2", "Bearer operator-secre",
                                    "Token operator-secret"])
def test_anything_but_the_exact_bearer_token_is_refused(header: str | None) -> None:
    """Other schemes, empty values, prefixes and extensions of the token are all refused with 401."""
    auth = Authenticator(ADMIN, CONSUMERS)
    with pytest.raises(Unauthorized):
        auth.operator(request(header))  # type: ignore[arg-type]
    with pytest.raises(Unauthorized):
        auth.consumer_or_operator(request(header))  # type: ignore[arg-type]


def test_consumers_are_known_by_name_and_never_admitted_as_operator() -> None:
    """A consumer's token names the consumer on consumer endpoints and is refused on operator ones."""
    auth = Authenticator(ADMIN, CONSUMERS)
    for name, token in CONSUMERS.items():
        assert auth.consumer_or_operator(request(f"Bearer {token}")) == name  # type: ignore[arg-type]
        with pytest.raises(Unauthorized, match="operator's bearer token"):
            auth.operator(request(f"Bearer {token}"))  # type: ignore[arg-type]


def test_without_an_operator_token_configured_no_one_is_the_operator() -> None:
    """An unset or empty AMO_ADMIN_TOKEN never matches, not even an empty or bare bearer header."""
    for admin in (None, ""):
        auth = Authenticator(admin, {})
        for header in ("Bearer ", "Bearer", "Bearer x"):
            with pytest.raises(Unauthorized):
                auth.operator(request(header))  # type: ignore[arg-type]
            with pytest.raises(Unauthorized):
                auth.consumer_or_operator(request(header))  # type: ignore[arg-type]


def test_refusals_say_which_token_is_needed() -> None:
    """The 401 detail tells the caller what to present, without echoing what they sent."""
    auth = Authenticator(ADMIN, CONSUMERS)
    with pytest.raises(Unauthorized) as operator_only:
        auth.operator(request("Bearer wrong-guess"))  # type: ignore[arg-type]
    assert operator_only.value.detail == "this endpoint needs the operator's bearer token (AMO_ADMIN_TOKEN)"
    with pytest.raises(Unauthorized) as any_caller:
        auth.consumer_or_operator(request("Bearer wrong-guess"))  # type: ignore[arg-type]
    assert any_caller.value.detail == "a valid bearer token is required (the operator's or a consumer's)"


def test_consumer_list_accepts_commas_newlines_and_blanks() -> None:
    """`name:token` entries split on commas or newlines; blank entries are skipped; a token may hold colons."""
    text = "crm-sync:consumer-secret-1\nbilling:consumer-secret-3,\n reports : consumer:secret:2 \n\n,"
    assert parse_consumers(text) == {"crm-sync": "consumer-secret-1", "billing": "consumer-secret-3",
                                     "reports ": " consumer:secret:2"}
    assert parse_consumers("") == {}


@pytest.mark.parametrize("text", ["crm-sync", ":token", "crm-sync:", "a:1,broken"])
def test_consumer_entry_without_name_or_token_is_a_config_error(text: str) -> None:
    """A malformed entry stops start-up with a message that does not print the entry (it holds a secret)."""
    with pytest.raises(ConfigError) as caught:
        parse_consumers(text)
    assert caught.value.detail == ("AMO_CONSUMER_TOKENS entries must be name:token (one entry has no name or"
                                   " token)")


def test_authenticator_takes_its_tokens_from_the_settings() -> None:
    """AMO_ADMIN_TOKEN and AMO_CONSUMER_TOKENS are what the authenticator admits; repr shows names only."""
    settings = Settings.model_validate({"admin_token": ADMIN, "consumer_tokens": "crm-sync:consumer-secret-1"})
    auth = Authenticator.from_settings(settings)
    assert auth.operator(request(f"Bearer {ADMIN}")) == OPERATOR  # type: ignore[arg-type]
    assert auth.consumer_or_operator(request("Bearer consumer-secret-1")) == "crm-sync"  # type: ignore[arg-type]
    assert repr(auth) == "Authenticator(consumers=['crm-sync'])"
    assert ADMIN not in repr(auth)
    none_set = Authenticator.from_settings(Settings.model_validate({}))
    with pytest.raises(Unauthorized):
        none_set.consumer_or_operator(request("Bearer consumer-secret-1"))  # type: ignore[arg-type]
