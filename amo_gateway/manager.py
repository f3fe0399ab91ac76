"""The token manager: single-flight refresh across coroutines and processes, persisting before use.

A refresh takes the account's refresh lock, re-reads the vault under the file lock, skips when another
process already did the work, marks the refresh as in flight, calls amoCRM, and stores the new pair
before anyone sees it. A marker that survives a crash tells, on the next attempt, that an answer was lost.
A batch of due accounts shares one vault write to claim them and one to store their results, so a
refresh storm over thousands of accounts does not rewrite the vault once per account. With `batch_size`
(PostgreSQL) a storm is cut into batches of that many, two at a time: the next batch claims while this one's
calls are in flight, and a crash mid-storm loses at most the answers of the batches then in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from amo_gateway.accounts import account_url, amo_subdomain, host_of
from amo_gateway.amo_client import AmoClient
from amo_gateway.backends.base import Claim, RefreshLockSet, StateStore
from amo_gateway.clock import Clock
from amo_gateway.errors import (
    NotConnected,
    ReauthRequired,
    StateUnavailable,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRejected,
    UpstreamUnauthorized,
    VaultError,
    VaultFull,
)
from amo_gateway.headroom import no_room
from amo_gateway.logs import event
from amo_gateway.settings import DEFAULT_BASE_DOMAINS
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
BATCH_CONCURRENCY = 16  # amoCRM calls in flight at once, shared by the batches of a storm
BATCHES_AT_ONCE = 2
SHARED_BATCH = 250  # accounts per claim and per store in a storm on PostgreSQL (scripts/bench_pg.py measured it)


@dataclass(frozen=True)
class Outcome:
    """What one refresh attempt came to: refreshed, skipped, transient, reauth, or refused_… (nothing sent)."""

    account_id: str
    result: str
    account: Account | None = None
    error: UpstreamError | None = None
    reason: str | None = None
    pair: TokenPair | None = None
    keep_marker: bool = False
    moved_to: tuple[str, str | None] | None = None


Observer = Callable[[Outcome], None]


class TokenManager:
    """Hands out current tokens and refreshes them, one refresh per account at a time."""

    def __init__(self, store: StateStore, client: AmoClient, locks: RefreshLockSet, clock: Clock, *, margin: float,
                 url_template: str = "https://{host}", base_domains: Sequence[str] = DEFAULT_BASE_DOMAINS,
                 batch_size: int | None = None) -> None:
        self.store = store
        self.client = client
        self.locks = locks
        self.clock = clock
        self.margin = margin
        self.url_template = url_template
        self.base_domains = base_domains
        self.batch_size = batch_size  # None: a storm is one batch (each file vault write rewrites every account)
        self.observers: list[Observer] = []
        self._running: set[asyncio.Future[list[Outcome]]] = set()

    async def connected(self, account_id: str) -> Account:
        """The account with a usable pair, or NotConnected / ReauthRequired."""
        account = await self.store.account(account_id)
        if account is None or account.tokens is None:
            raise NotConnected("no amoCRM account is connected; run the API-key exchange or the consent flow")
        if account.status != CONNECTED:
            raise ReauthRequired(f"amoCRM access needs re-authorization: {account.reason}", reason=account.reason)
        return account

    async def access(self, account_id: str) -> TokenPair:
        """A pair whose access token is valid now, refreshing first if it has (nearly) expired.

        A second round covers a stale view: the pair this process saw may have been replaced by another
        process with one that is itself expired by now; that one is refreshed too rather than handed out.
        """
        for _ in range(2):
            account = await self.connected(account_id)
            assert account.tokens is not None
            if not account.tokens.expired(self.clock.time()):
                return account.tokens
            if account.long_lived:
                raise ReauthRequired("the long-lived token has expired: import a new one", reason="long_lived_expired")
            outcome = await self.refresh(account_id, seen=account.tokens.access_token)
            if outcome.result == "transient" and outcome.error is not None:
                raise outcome.error
        fresh = (await self.connected(account_id)).tokens
        assert fresh is not None
        if fresh.expired(self.clock.time(), leeway=0):
            # The refresh was someone else's and this view never caught up (a lost LISTEN, a database away):
            # read the backend once, and never hand out a token that has already expired.
            await self.store.reload()
            fresh = (await self.connected(account_id)).tokens
            assert fresh is not None
            if fresh.expired(self.clock.time(), leeway=0):
                raise StateUnavailable("no unexpired access token is visible yet (another process is refreshing "
                                       "it, or the shared state is out of reach); retry shortly")
        return fresh

    async def refresh(self, account_id: str, *, seen: str | None = None) -> Outcome:
        """Refresh now (waiting for the lock) unless another worker already replaced the `seen` access token."""
        return (await self._shielded(self._refresh_waiting(account_id, seen)))[0]

    async def refresh_due(self, account_ids: Iterable[str]) -> list[Outcome]:
        """The scheduler's entry: refresh the due ones in batches; skip those someone else holds."""
        return await self._shielded(self._refresh_batches(list(account_ids)))

    async def drain(self) -> None:
        """Wait for refreshes already sent to amoCRM, so that shutdown never strands a spent token."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _shielded(self, work: Coroutine[Any, Any, list[Outcome]]) -> list[Outcome]:
        """Run a refresh as its own task: a cancelled caller must not cut a refresh between send and store."""
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    async def _refresh_waiting(self, account_id: str, seen: str | None) -> list[Outcome]:
        async with self.locks.hold(account_id):
            return await self._claimed_run([account_id], seen, skip_locked=False)

    async def _refresh_batches(self, account_ids: list[str]) -> list[Outcome]:
        """Every batch runs to its end (its answers stored) even when another fails; then the first error is raised."""
        size = self.batch_size or max(len(account_ids), 1)
        gate, lanes = asyncio.Semaphore(BATCH_CONCURRENCY), asyncio.Semaphore(BATCHES_AT_ONCE)

        async def lane(batch: list[str]) -> list[Outcome]:
            async with lanes:
                return await self._refresh_batch(batch, gate)

        done = await asyncio.gather(*(lane(account_ids[i:i + size]) for i in range(0, len(account_ids), size)),
                                    return_exceptions=True)
        for result in done:
            if isinstance(result, BaseException):
                raise result
        return [outcome for result in done if not isinstance(result, BaseException) for outcome in result]

    async def _refresh_batch(self, account_ids: list[str], gate: asyncio.Semaphore) -> list[Outcome]:
        held = await self.locks.try_hold_many(account_ids)
        taken = set(held)
        skipped = [Outcome(a, "skipped") for a in account_ids if a not in taken]
        try:
            return skipped + (await self._claimed_run(held, None, skip_locked=True, gate=gate) if held else [])
        finally:
            await self.locks.release_many(held)

    async def _claimed_run(self, account_ids: list[str], seen: str | None, *, skip_locked: bool,
                           gate: asyncio.Semaphore | None = None) -> list[Outcome]:
        """Claim (one write), call amoCRM (bounded concurrency), store every result (one write)."""
        now = self.clock.time()
        claims = await self._claim(account_ids, now, seen, skip_locked)
        gate = gate or asyncio.Semaphore(BATCH_CONCURRENCY)

        async def one(claim: tuple[Account, InFlight | None]) -> Outcome:
            async with gate:
                return await self._attempt(*claim)

        attempts = list(await asyncio.gather(*(one(c) for c in claims)))
        stored = await self.store.store_outcomes(attempts, self.clock.time()) if attempts else {}
        outcomes = [replace(o, account=stored.get(o.account_id)) for o in attempts]
        unclaimed = {c[0].account_id for c in claims}
        outcomes += [Outcome(a, "skipped", await self.store.account(a)) for a in account_ids if a not in unclaimed]
        for outcome in outcomes:
            self._report(outcome)
        return outcomes

    async def _claim(self, account_ids: list[str], now: float, seen: str | None, skip_locked: bool) -> list[Claim]:
        """Mark the refreshes in flight; a disk without room for their results refuses them before any send."""
        try:
            return await self.store.claim(account_ids, now, self.margin, seen, skip_locked=skip_locked)
        except OSError as err:
            raise self._refused(account_ids, err) from err

    def _refused(self, account_ids: list[str], err: OSError) -> VaultError:
        """Say that no refresh was sent and why (log, /metrics, audit trail); the error for the caller."""
        result = "refused_disk_full" if no_room(err) else "refused_vault_unwritable"
        event(log, f"refresh.{result}", level=logging.ERROR, accounts=",".join(account_ids), error=err.strerror,
              vault=self.store.where)
        for account_id in account_ids:
            self._report(Outcome(account_id, result))
        if no_room(err):
            return VaultFull("the vault's disk has no room to store a refreshed pair: the refresh was not sent"
                             " to amoCRM and the current pair is kept; free some space")
        return VaultError(f"the vault could not be written ({err.strerror}): the refresh was not sent to amoCRM"
                          " and the current pair is kept")

    async def _attempt(self, account: Account, previous: InFlight | None) -> Outcome:
        """Spend the refresh token once; follow an account move; never write the vault here."""
        assert account.tokens is not None and account.tokens.refresh_token is not None
        token = account.tokens.refresh_token
        try:
            body = await self.client.token_from_refresh(account.base_url, token)
        except (UpstreamUnauthorized, UpstreamNotFound) as err:
            moved = await self._find_new_host(account, token, err)
            if moved is None:
                return _rejected(account, previous, err)
            outcome = await self._attempt(replace(account, base_url=moved[0]), previous)
            return replace(outcome, moved_to=moved)
        except UpstreamRejected as err:
            return _rejected(account, previous, err)
        except UpstreamError as err:
            unsure = bool(err.extra.get("maybe_processed"))  # amoCRM may have spent the token: keep the marker
            return Outcome(account.account_id, "transient", error=err, keep_marker=unsure)
        return Outcome(account.account_id, "refreshed", pair=pair_from_response(body, self.clock.time()))

    async def _find_new_host(self, account: Account, token: str, err: UpstreamError) -> tuple[str, str | None] | None:
        """After a 401/404 that is not a revocation, ask api_domain where the account lives now.

        Both hosts must be amoCRM/Kommo hosts from the referer allow-list: api_domain comes from an unverified
        JWT claim and receives the refresh token; the answered host would receive the client secret next.
        """
        if err.extra.get("hint") == REVOKED_HINT or not account.api_domain:
            return None
        api_host = host_of(account.api_domain)
        if not self._amo_host(account, "api_domain", api_host):
            return None
        try:
            where = await self.client.current_subdomain(account_url(self.url_template, api_host), token)
        except UpstreamError:
            return None
        domain = host_of(str(where.get("domain") or ""))
        new_base = account_url(self.url_template, domain) if domain else ""
        if not new_base or new_base == account.base_url or not self._amo_host(account, "new_host", domain):
            return None
        event(log, "account.moved", level=logging.WARNING, account=account.account_id,
              old_host=account.base_url, new_host=new_base)
        return new_base, amo_subdomain(domain, self.base_domains)

    def _amo_host(self, account: Account, role: str, host: str) -> bool:
        """True for `{sub}.{allowed base domain}`; anything else is logged and never contacted."""
        if amo_subdomain(host, self.base_domains) is not None:
            return True
        event(log, "account.move_refused", level=logging.WARNING, account=account.account_id, role=role,
              host=host[:253], detail="not an amoCRM/Kommo host from AMO_ALLOWED_BASE_DOMAINS; account left as it was")
        return False

    def _report(self, outcome: Outcome) -> None:
        if outcome.result == "refreshed" and outcome.pair is not None:
            event(log, "refresh.ok", account=outcome.account_id, expires_at=round(outcome.pair.expires_at),
                  refresh_fp=fingerprint(outcome.pair.refresh_token))
        elif outcome.result == "transient" and outcome.error is not None:
            event(log, "refresh.transient", level=logging.WARNING, account=outcome.account_id,
                  error=outcome.error.code, detail=outcome.error.detail)
        elif outcome.result == "reauth":
            event(log, "refresh.reauth_required", level=logging.ERROR, account=outcome.account_id,
                  reason=outcome.reason)
        for observer in self.observers:
            observer(outcome)


def _rejected(account: Account, previous: InFlight | None, err: UpstreamError) -> Outcome:
    """A definitive refusal: the pair is dead; say why as precisely as the evidence allows."""
    hint = str(err.extra.get("hint") or err.detail)
    if previous is not None and hint == REVOKED_HINT:
        reason = "refresh_answer_lost: a refresh was sent before a crash or timeout and its answer never stored"
    elif hint == REVOKED_HINT:
        reason = "token_revoked: amoCRM revoked the refresh token (used elsewhere, or the integration was reset)"
    else:
        reason = f"refresh_rejected: {hint}"
    return Outcome(account.account_id, "reauth", error=err, reason=reason)


def _claim(data: VaultData, account_ids: list[str], now: float, margin: float, seen: str | None
           ) -> list[Claim] | Unchanged[list[Claim]]:
    """Inside the file lock: which refreshes still need doing (re-read, not cached), marked in flight."""
    claims: list[Claim] = []
    for account_id in account_ids:
        account = data.accounts.get(account_id)
        if account is None or account.tokens is None or account.tokens.refresh_token is None:
            continue
        if account.status != CONNECTED or account.long_lived:
            continue
        replaced = seen is not None and account.tokens.access_token != seen
        if replaced or (seen is None and not needs_refresh(account, now, margin)):
            continue
        marked = replace(account, in_flight=InFlight(fingerprint(account.tokens.refresh_token), now))
        data.accounts[account_id] = marked
        claims.append((marked, account.in_flight))
    return claims if claims else Unchanged(claims)


def _apply(data: VaultData, outcomes: list[Outcome], now: float) -> dict[str, Account]:
    """Inside the file lock: store every result; an account disconnected meanwhile stays forgotten.

    A transient failure keeps the time the failing began (`failing_since`), durable and shared by every
    process on the vault, so that "refresh failing for longer than AMO_ALERT_TRANSIENT_AFTER" is one fact.
    """
    stored: dict[str, Account] = {}
    for outcome in outcomes:
        account = data.accounts.get(outcome.account_id)
        if account is None:
            continue
        if outcome.moved_to is not None:
            base_url, subdomain = outcome.moved_to
            account = replace(account, base_url=base_url, subdomain=subdomain or account.subdomain)
        if outcome.result == "refreshed" and outcome.pair is not None:
            account = account.with_pair(outcome.pair)
        elif outcome.result == "reauth":
            account = account.needing_reauth(outcome.reason or "refresh_rejected")
        else:
            error = outcome.error.detail if outcome.error else None
            account = replace(account, in_flight=account.in_flight if outcome.keep_marker else None, last_error=error,
                              failing_since=account.failing_since or now)
        data.accounts[outcome.account_id] = stored[outcome.account_id] = account
    return stored
