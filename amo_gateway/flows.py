"""The seed's OAuth flows: API-key exchange, consent URL, callback, disconnect. No HTTP types here."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlencode

from amo_gateway.accounts import DEFAULT_ACCOUNT, account_subdomain, base_url_for_referer, select_account
from amo_gateway.amo_client import AmoClient
from amo_gateway.backends.base import StateStore
from amo_gateway.clock import Clock
from amo_gateway.errors import (
    BadRequest,
    ExchangeTooSoon,
    Forbidden,
    InvalidState,
    NotFound,
    RefererRefused,
    StillConnected,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnauthorized,
)
from amo_gateway.logs import event
from amo_gateway.settings import Settings
from amo_gateway.tokens import (
    CONNECTED,
    Account,
    PendingState,
    TokenPair,
    VaultData,
    decode_claims,
    fingerprint,
    pair_from_response,
)
from amo_gateway.vault import Unchanged

log = logging.getLogger("amo_gateway.flows")
CALLBACK_TOKEN_TIMEOUT = 2.5  # amoCRM waits 3 s for the callback and never resends it
Pacer = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class Connected:
    """A callback's result: which account, and whether it came from an API-key exchange."""

    account_id: str
    from_exchange: bool
    label: str | None
    expires_at: float


class Flows:
    """Issues states, talks to amoCRM for the flows, and records the results in the vault."""

    def __init__(self, settings: Settings, store: StateStore, client: AmoClient, clock: Clock) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.clock = clock

    async def exchange_api_key(self, login: str, api_key: str, label: str | None, account: str | None) -> None:
        """Reserve the login's 5-minute slot, issue a state, and ask amoCRM to send a code to the callback."""
        base_url = await self._target_base_url(account)
        slot = _slot_key(login)
        state = secrets.token_urlsafe(32)
        now = self.clock.time()
        pending = PendingState("exchange", now, now + self.settings.state_ttl, label, login, base_url)
        until = now + self.settings.exchange_interval
        await self.store.reserve_exchange(slot, now, until, _digest(state), pending)
        try:
            await self.client.exchange_api_key(base_url, login=login, api_key=api_key, state=state)
        except UpstreamRateLimited as err:  # amoCRM counted the call: the slot stays taken
            raise ExchangeTooSoon("amoCRM says the exchange was called too often for this login; retry later",
                                  retry_after=self.settings.exchange_interval) from err
        except UpstreamError:
            await self.store.release_exchange(slot, _digest(state))
            raise
        event(log, "exchange.requested", login=login, label=label, state_fp=fingerprint(state))

    async def authorize_url(self, label: str | None, *, popup: bool = False) -> str:
        """A consent-page URL carrying a fresh single-use state (`popup`: for the console's consent window)."""
        self.settings.require("client_id")
        state = secrets.token_urlsafe(32)
        now = self.clock.time()
        pending = PendingState("console" if popup else "authorize", now, now + self.settings.state_ttl, label)
        await self.store.add_state(_digest(state), pending, now)
        query = urlencode({"client_id": self.settings.client_id, "state": state, "mode": "post_message"})
        return f"{self.settings.auth_url}?{query}"

    async def callback(
        self, code: str, state: str | None, referer: str | None, *, from_exchange: bool, from_widget: bool
    ) -> Connected:
        """Check state and referer before any token call, redeem the code once, and store the pair."""
        pending = await self._peek_state(state, from_widget)
        base_url = self._callback_base_url(referer, pending)
        if state is not None:
            await self._consume_state(state)
        now = self.clock.time()
        body = await self.client.token_from_code(base_url, code, time_limit=CALLBACK_TOKEN_TIMEOUT)
        pair = pair_from_response(body, now)
        account = self._account_for(pair, base_url, now)
        await self.store.put_account(account)  # the code is spent: its pair must land (the file may spend its reserve)
        exchange = from_exchange or (pending is not None and pending.purpose == "exchange")
        label = pending.label if pending else None
        event(log, "callback.connected", account=account.account_id, from_exchange=exchange, label=label,
              refresh_fp=fingerprint(pair.refresh_token))
        return Connected(account.account_id, exchange, label, pair.expires_at)

    async def for_popup(self, state: str | None) -> bool:
        """True when `state` is a live state the console issued for its consent popup (nothing is consumed)."""
        if state is None:
            return False
        found = await self.store.peek_state(_digest(state))
        return found is not None and found.purpose == "console" and found.expires_at > self.clock.time()

    async def disconnect(self, account_id: str, client_uuid: str, signature: str, *,
                         pace: Pacer | None = None) -> bool:
        """Verify amoCRM's HMAC signature in constant time, confirm the token is dead, then forget the account.

        The signature never changes for an account, so a captured hook URL replays forever: the account is
        forgotten only once amoCRM refuses its access token. `pace` takes the account's rate-limit slot first,
        so replays cannot push amoCRM past its 7 requests a second.
        """
        secret = self.settings.secret("client_secret") or ""
        expected = hmac.new(secret.encode(), f"{client_uuid}|{account_id}".encode(), hashlib.sha256).hexdigest()
        same_client = hmac.compare_digest(client_uuid.encode(), (self.settings.client_id or "").encode())
        if not (secret and same_client and hmac.compare_digest(expected.encode(), signature.lower().encode())):
            raise Forbidden("the disconnect signature does not verify", code="invalid_signature")
        account = await self.store.account(account_id)
        if account is not None and account.tokens is not None and account.status == CONNECTED:
            await self._confirm_token_dead(account, account.tokens.access_token, pace)
        removed = await self.store.forget(account_id)
        event(log, "disconnect.accepted", account=account_id, had_tokens=removed)
        return removed

    async def _confirm_token_dead(self, account: Account, access_token: str, pace: Pacer | None) -> None:
        """Return when amoCRM answers 401 to the account's token; otherwise the disconnect is refused."""
        if pace is not None:
            await pace(account.account_id)
        try:
            await self.client.account(account.base_url, access_token)
        except UpstreamUnauthorized:
            return
        except UpstreamError as err:
            event(log, "disconnect.unconfirmed", level=logging.WARNING, account=account.account_id, error=err.code)
            raise
        event(log, "disconnect.replayed", level=logging.WARNING, account=account.account_id)
        raise StillConnected("amoCRM still accepts this account's token, so the integration was not removed "
                             "(a replayed disconnect hook?); the account was kept")

    async def _target_base_url(self, account: str | None) -> str:
        """The connected account named by ?account=, a new allowed account host, or the configured host."""
        if account:
            data = await self.store.snapshot()
            try:
                return data.accounts[select_account(data, account)].base_url
            except NotFound:
                if "." not in account:
                    raise
            try:
                return base_url_for_referer(account, self.settings)
            except RefererRefused:
                raise BadRequest("that host is not an allowed amoCRM/Kommo account",
                                 code="account_not_allowed") from None
        self.settings.require("base_url")
        return self.settings.account_base_url  # type: ignore[return-value]

    async def _peek_state(self, state: str | None, from_widget: bool) -> PendingState | None:
        if state is None:
            if from_widget and self.settings.widget_installs:
                return None
            raise InvalidState("the callback has no state (widget installs are not enabled)", code="missing_state")
        found = await self.store.peek_state(_digest(state))
        if found is None or found.expires_at <= self.clock.time():
            raise InvalidState("the state is unknown, expired or already used")
        return found

    async def _consume_state(self, state: str) -> None:
        """Single use across processes: the one that pops it (under the file lock, or in its transaction) wins."""
        popped = await self.store.pop_state(_digest(state))
        if popped is None:
            raise InvalidState("the state is unknown, expired or already used")

    def _callback_base_url(self, referer: str | None, pending: PendingState | None) -> str:
        """The host to redeem the code at: the referer's, which must be the one the state was issued for."""
        if referer:
            base_url = base_url_for_referer(referer, self.settings)
            if pending is not None and pending.base_url and pending.base_url != base_url:
                # An exchange's state names its account: a state leaked for one account cannot connect another.
                raise RefererRefused("the callback's referer is not the account its state was issued for")
            return base_url
        if pending is not None and pending.base_url:
            return pending.base_url
        self.settings.require("base_url")
        return self.settings.account_base_url  # type: ignore[return-value]

    def _account_for(self, pair: TokenPair, base_url: str, now: float) -> Account:
        claims = decode_claims(pair.access_token)
        account_id = str(claims.get("account_id") or self.settings.account_id or DEFAULT_ACCOUNT)
        api_domain = claims.get("api_domain") or self.settings.api_domain
        return Account(account_id=account_id, base_url=base_url, api_domain=api_domain,
                       subdomain=account_subdomain(base_url, self.settings), connected_at=now).with_pair(pair)



def _digest(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def _slot_key(login: str) -> str:
    return hashlib.sha256(login.strip().lower().encode()).hexdigest()


def _reserve(data: VaultData, slot: str, now: float, until: float, state_key: str, pending: PendingState) -> None:
    data.prune(now)
    taken = data.exchange_slots.get(slot)
    if taken is not None and taken > now:
        raise ExchangeTooSoon("the API-key exchange for this login was called less than 5 minutes ago",
                              retry_after=max(int(taken - now) + 1, 1))
    data.exchange_slots[slot] = until  # taken before amoCRM is asked; given back only if amoCRM did not count it
    data.states[state_key] = pending


def _release(data: VaultData, slot: str, state_key: str) -> None:
    data.exchange_slots.pop(slot, None)
    data.states.pop(state_key, None)


def _add_state(data: VaultData, key: str, pending: PendingState, now: float) -> None:
    data.prune(now)
    data.states[key] = pending


def _pop_state(data: VaultData, key: str) -> PendingState | Unchanged[PendingState | None] | None:
    popped = data.states.pop(key, None)
    return popped if popped is not None else Unchanged(None)


def _forget(data: VaultData, account_id: str) -> bool | Unchanged[bool]:
    if data.accounts.pop(account_id, None) is None:
        return Unchanged(False)
    return True

