"""The token manager: single-flight refresh across coroutines and processes, persisting before use.

A refresh takes the account's refresh lock, re-reads the vault under the file lock, skips when another
process already did the work, marks the refresh as in flight, calls amoCRM, and stores the new pair
before anyone sees it. A marker that survives a crash tells, on the next attempt, that an answer was lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from amo_gateway.amo_client import AmoClient
from amo_gateway.clock import Clock
from amo_gateway.errors import (
    NotConnected,
    ReauthRequired,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRejected,
    UpstreamUnauthorized,
)
from amo_gateway.locks import RefreshLocks
from amo_gateway.logs import event
from amo_gateway.store import Store
from amo_gateway.tokens import (
    CONNECTED,
    Account,
    InFlight,
    TokenPair,
    VaultData,
    fingerprint,
    needs_refresh,
    pair_from_response,
)
from amo_gateway.vault import Unchanged

log = logging.getLogger("amo_gateway.refresh")
REVOKED_HINT = "Token has been revoked"


@dataclass(frozen=True)
class Outcome:
    """What one refresh attempt came to, for the scheduler and the metrics."""

    account_id: str
    result: str  # "refreshed" | "skipped" | "transient" | "reauth"
    account: Account | None = None
    error: UpstreamError | None = None


class TokenManager:
    """Hands out current tokens and refreshes them, one refresh per account at a time."""

    def __init__(
        self, store: Store, client: AmoClient, locks: RefreshLocks, clock: Clock, *, margin: float
    ) -> None:
        self.store = store
        self.client = client
        self.locks = locks
        self.clock = clock
        self.margin = margin
        self._running: set[asyncio.Future[Outcome]] = set()

    async def connected(self, account_id: str) -> Account:
        """The account with a usable pair, or NotConnected / ReauthRequired."""
        account = await self.store.account(account_id)
        if account is None or account.tokens is None:
            raise NotConnected("no amoCRM account is connected; run the API-key exchange or the consent flow")
        if account.status != CONNECTED:
            raise ReauthRequired(f"amoCRM access needs re-authorization: {account.reason}", reason=account.reason)
        return account

    async def access(self, account_id: str) -> TokenPair:
        """A pair whose access token is valid now, refreshing first if it has (nearly) expired."""
        account = await self.connected(account_id)
        assert account.tokens is not None
        if not account.tokens.expired(self.clock.time()) or account.long_lived:
            return account.tokens
        outcome = await self.refresh(account_id, seen=account.tokens.access_token)
        if outcome.result == "transient" and outcome.error is not None:
            raise outcome.error
        return (await self.connected(account_id)).tokens  # type: ignore[return-value]

    async def refresh(self, account_id: str, *, seen: str | None = None) -> Outcome:
        """Refresh now (waiting for the lock) unless another worker already replaced the `seen` access token."""
        return await self._shielded(self._refresh_waiting(account_id, seen))

    async def refresh_if_due(self, account_id: str) -> Outcome:
        """The scheduler's entry: refresh when due; skip at once if someone else holds the lock."""
        return await self._shielded(self._refresh_trying(account_id))

    async def drain(self) -> None:
        """Wait for refreshes already sent to amoCRM, so that shutdown never strands a spent token."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _shielded(self, work: Coroutine[Any, Any, Outcome]) -> Outcome:
        """Run a refresh as its own task: a cancelled caller must not cut a refresh between send and store."""
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    async def _refresh_waiting(self, account_id: str, seen: str | None) -> Outcome:
        async with self.locks.hold(account_id):
            return await self._refresh_locked(account_id, seen=seen)

    async def _refresh_trying(self, account_id: str) -> Outcome:
        if not await self.locks.try_hold(account_id):
            return Outcome(account_id, "skipped")
        try:
            return await self._refresh_locked(account_id, seen=None)
        finally:
            self.locks.release(account_id)

    async def _refresh_locked(self, account_id: str, *, seen: str | None) -> Outcome:
        now = self.clock.time()
        plan = await self.store.update(lambda data: _claim(data, account_id, now, self.margin, seen))
        if plan is None:
            return Outcome(account_id, "skipped", await self.store.account(account_id))
        account, previous = plan
        return await self._spend(account, previous)

    async def _spend(self, account: Account, previous: InFlight | None) -> Outcome:
        assert account.tokens is not None and account.tokens.refresh_token is not None
        refresh_token = account.tokens.refresh_token
        try:
            body = await self.client.token_from_refresh(account.base_url, refresh_token)
        except (UpstreamUnauthorized, UpstreamNotFound) as err:
            moved = await self._follow_move(account, refresh_token, err)
            if moved is not None:
                return await self._spend(moved, previous)
            return await self._give_up(account, previous, err)
        except UpstreamRejected as err:
            return await self._give_up(account, previous, err)
        except UpstreamError as err:
            return await self._transient(account, err)
        pair = pair_from_response(body, self.clock.time())
        stored = await self.store.update(lambda data: _store_pair(data, account.account_id, pair))
        event(log, "refresh.ok", account=account.account_id, expires_at=round(pair.expires_at),
              refresh_fp=fingerprint(pair.refresh_token))
        return Outcome(account.account_id, "refreshed", stored)

    async def _transient(self, account: Account, err: UpstreamError) -> Outcome:
        """Keep the old pair; the in-flight marker stays only when amoCRM may have processed the request."""
        if not err.extra.get("maybe_processed"):
            await self.store.update(lambda data: _clear_in_flight(data, account.account_id, err.detail))
        event(log, "refresh.transient", level=logging.WARNING, account=account.account_id,
              error=err.code, detail=err.detail)
        return Outcome(account.account_id, "transient", account, err)

    async def _give_up(self, account: Account, previous: InFlight | None, err: UpstreamError) -> Outcome:
        hint = str(err.extra.get("hint") or err.detail)
        if previous is not None and hint == REVOKED_HINT:
            reason = "refresh_answer_lost: a refresh was sent before a crash or timeout and its answer never stored"
        elif hint == REVOKED_HINT:
            reason = "token_revoked: amoCRM revoked the refresh token (used elsewhere, or the integration was reset)"
        else:
            reason = f"refresh_rejected: {hint}"
        stored = await self.store.update(lambda data: _mark_reauth(data, account.account_id, reason))
        event(log, "refresh.reauth_required", level=logging.ERROR, account=account.account_id, reason=reason)
        return Outcome(account.account_id, "reauth", stored, err)

    async def _follow_move(self, account: Account, refresh_token: str, err: UpstreamError) -> Account | None:
        """After a 401/404 that is not a revocation, ask api_domain where the account lives now."""
        if err.extra.get("hint") == REVOKED_HINT or not account.api_domain:
            return None
        scheme = urlsplit(account.base_url).scheme or "https"
        try:
            where = await self.client.current_subdomain(f"{scheme}://{account.api_domain}", refresh_token)
        except UpstreamError:
            return None
        domain = str(where.get("domain") or "")
        new_base = f"{scheme}://{domain}" if domain else ""
        if not new_base or new_base == account.base_url:
            return None
        moved = await self.store.update(lambda data: _move(data, account.account_id, new_base, where))
        event(log, "account.moved", level=logging.WARNING, account=account.account_id,
              old_host=account.base_url, new_host=new_base)
        return moved


Claim = tuple[Account, InFlight | None] | None


def _claim(data: VaultData, account_id: str, now: float, margin: float, seen: str | None) -> Claim | Unchanged[Claim]:
    """Inside the file lock: decide whether this refresh still needs doing, and mark it in flight."""
    account = data.accounts.get(account_id)
    if account is None or account.tokens is None or account.tokens.refresh_token is None:
        return Unchanged(None)
    if account.status != CONNECTED or account.long_lived:
        return Unchanged(None)
    replaced = seen is not None and account.tokens.access_token != seen
    if replaced or (seen is None and not needs_refresh(account, now, margin)):
        return Unchanged(None)
    marked = replace(account, in_flight=InFlight(fingerprint(account.tokens.refresh_token), now))
    data.accounts[account_id] = marked
    return marked, account.in_flight


def _store_pair(data: VaultData, account_id: str, pair: TokenPair) -> Account | None:
    account = data.accounts.get(account_id)
    if account is None:  # disconnected while the refresh was in flight: forget the new pair too
        return None
    data.accounts[account_id] = account.with_pair(pair)
    return data.accounts[account_id]


def _clear_in_flight(data: VaultData, account_id: str, error: str) -> None:
    account = data.accounts.get(account_id)
    if account is not None:
        data.accounts[account_id] = replace(account, in_flight=None, last_error=error)


def _mark_reauth(data: VaultData, account_id: str, reason: str) -> Account | None:
    account = data.accounts.get(account_id)
    if account is None:
        return None
    data.accounts[account_id] = account.needing_reauth(reason)
    return data.accounts[account_id]


def _move(data: VaultData, account_id: str, base_url: str, where: dict[str, object]) -> Account | None:
    account = data.accounts.get(account_id)
    if account is None:
        return None
    subdomain = str(where.get("subdomain") or account.subdomain or "")
    data.accounts[account_id] = replace(account, base_url=base_url, subdomain=subdomain or None)
    return data.accounts[account_id]

