"""The token manager's decisions one by one (manager.py), against a scripted amoCRM: tests the mutation gate asked for.

The rig tests drive the manager through the real sandbox; these hand it a fake client whose answers are
scripted per call, so each branch (skip, move, rejection, transient, the log events) is pinned exactly.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from amo_gateway.errors import (
    NotConnected,
    ReauthRequired,
    StateUnavailable,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    VaultError,
    VaultFull,
)
from amo_gateway.locks import RefreshLocks
from amo_gateway.manager import REVOKED_HINT, Outcome, TokenManager, _apply, _claim
from amo_gateway.store import Store
from amo_gateway.tokens import CONNECTED, REAUTH_REQUIRED, Account, InFlight, TokenPair, VaultData, fingerprint
from amo_gateway.vault import KeyRing, Unchanged, Vault
from tests.conftest import FakeClock

NOW = 1_800_000_000.0
DUE = NOW + 3100  # past the due time (expiry - margin - spread), before the access token expires
EXPIRED = NOW + 3590
ID = "42"
OLD_HOST = "https://old.amocrm.ru"


def answer(n: int) -> dict[str, Any]:
    """amoCRM's token answer number n."""
    return {"access_token": f"access-{n}", "refresh_token": f"refresh-{n}", "expires_in": 3600, "token_type": "Bearer"}


def account(**changes: Any) -> Account:
    """The account as the vault holds it after a connect at NOW."""
    pair = TokenPair("access-1", "refresh-1", expires_at=NOW + 3600, obtained_at=NOW)
    fields: dict[str, Any] = {"account_id": ID, "base_url": OLD_HOST, "tokens": pair, "api_domain": "api-b.amocrm.ru",
                              "subdomain": "old", **changes}
    return Account(**fields)


class ScriptedAmo:
    """amoCRM's token endpoint and subdomain lookup, answering from a script and recording every call."""

    def __init__(self, *answers: dict[str, Any] | UpstreamError, where: dict[str, Any] | None = None) -> None:
        self.answers = list(answers)
        self.where = where if where is not None else {}
        self.sent: list[tuple[str, str]] = []
        self.lookups: list[str] = []

    async def token_from_refresh(self, base_url: str, refresh_token: str) -> dict[str, Any]:
        self.sent.append((base_url, refresh_token))
        next_answer = self.answers.pop(0)
        if isinstance(next_answer, UpstreamError):
            raise next_answer
        return next_answer

    async def current_subdomain(self, api_domain_url: str, refresh_token: str) -> dict[str, Any]:
        self.lookups.append(api_domain_url)
        return self.where


class Setup:
    """A manager on a real vault file with one account, and its scripted amoCRM."""

    def __init__(self, tmp_path: Path, keys: KeyRing) -> None:
        self.vault = Vault(tmp_path / "vault.enc", keys)
        self.vault.prepare()
        self.locks = RefreshLocks(tmp_path / "vault.enc.refresh.lock")
        self.clock = FakeClock(DUE)
        self.amo = ScriptedAmo()

    def manager(self, amo: ScriptedAmo, stored: Account | None = None, margin: float = 600) -> TokenManager:
        self.amo = amo
        if stored is not None:
            self.vault.update(lambda data: data.accounts.__setitem__(ID, stored))
        return TokenManager(Store(self.vault), amo, self.locks, self.clock, margin=margin)  # type: ignore[arg-type]

    def stored(self) -> Account:
        data, _ = self.vault.read()
        return data.accounts[ID]


@pytest.fixture
async def setup(tmp_path: Path, keys: KeyRing) -> AsyncIterator[Setup]:
    s = Setup(tmp_path, keys)
    yield s
    s.locks.close()


def events(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, dict[str, Any]]]:
    """The manager's structured log events: level, name, fields."""
    return [(r.levelno, r.getMessage(), getattr(r, "fields", {})) for r in caplog.records
            if r.name == "amo_gateway.refresh"]


async def test_refresh_outcome_carries_the_account_as_stored(setup: Setup) -> None:
    """Observers (the refresher, metrics) get the account with the new pair from the outcome itself."""
    manager = setup.manager(ScriptedAmo(answer(2)), account())
    outcome = await manager.refresh(ID)
    assert outcome.result == "refreshed"
    assert outcome.account == setup.stored()
    assert outcome.account is not None and outcome.account.tokens is not None
    assert outcome.account.tokens.refresh_token == "refresh-2"


async def test_refresh_of_a_token_someone_already_replaced_is_skipped_without_a_write(setup: Setup) -> None:
    """A caller that saw an older access token gets 'skipped' with the current account; the vault is untouched."""
    manager = setup.manager(ScriptedAmo(), account())
    before = setup.vault.signature()
    outcome = await manager.refresh(ID, seen="access-0")
    assert outcome == Outcome(ID, "skipped", setup.stored())
    assert setup.amo.sent == []
    assert setup.vault.signature() == before


async def test_batch_refresh_skips_an_account_whose_lock_another_worker_holds(setup: Setup) -> None:
    """The scheduler never waits: a held account comes back as 'skipped' by id, and nothing is sent."""
    manager = setup.manager(ScriptedAmo(answer(2)), account())
    async with setup.locks.hold(ID):
        outcomes = await manager.refresh_due([ID])
    assert outcomes == [Outcome(ID, "skipped")]
    assert setup.amo.sent == []


async def test_finished_refresh_is_not_kept_for_drain(setup: Setup) -> None:
    """A refresh task is forgotten once done: months of refreshes leave nothing behind for shutdown to await."""
    manager = setup.manager(ScriptedAmo(answer(2)), account())
    await manager.refresh(ID)
    assert manager._running == set()


async def test_unknown_account_or_one_without_a_pair_is_not_connected(setup: Setup) -> None:
    """No account, or an account with no pair, says how to connect rather than failing on the missing pair."""
    manager = setup.manager(ScriptedAmo(), account(tokens=None))
    for account_id in ("nobody", ID):
        with pytest.raises(NotConnected) as caught:
            await manager.connected(account_id)
        assert caught.value.detail == ("no amoCRM account is connected; run the API-key exchange or the consent"
                                       " flow")


async def test_account_needing_reauth_says_why(setup: Setup) -> None:
    """ReauthRequired carries the stored reason, which the HTTP answer and the status table show."""
    manager = setup.manager(ScriptedAmo(), account(status=REAUTH_REQUIRED, reason="token_revoked: gone"))
    with pytest.raises(ReauthRequired) as caught:
        await manager.connected(ID)
    assert caught.value.extra == {"reason": "token_revoked: gone"}
    assert caught.value.detail == "amoCRM access needs re-authorization: token_revoked: gone"


async def test_expired_long_lived_token_asks_for_a_new_one(setup: Setup) -> None:
    """A long-lived token is never refreshed: once expired, ReauthRequired says to import a new one."""
    pair = TokenPair("long-access", None, expires_at=NOW + 3600, obtained_at=NOW)
    manager = setup.manager(ScriptedAmo(), account(tokens=pair, long_lived=True))
    setup.clock.now = EXPIRED
    with pytest.raises(ReauthRequired) as caught:
        await manager.access(ID)
    assert caught.value.extra == {"reason": "long_lived_expired"}
    assert caught.value.detail == "the long-lived token has expired: import a new one"
    assert setup.amo.sent == []


async def test_expired_token_that_amocrm_revokes_asks_for_reauthorization(setup: Setup) -> None:
    """access() on a pair amoCRM refuses raises ReauthRequired (the operator's cue), not the upstream 401."""
    revoked = UpstreamUnauthorized(REVOKED_HINT, hint=REVOKED_HINT)
    manager = setup.manager(ScriptedAmo(revoked), account())
    setup.clock.now = EXPIRED
    with pytest.raises(ReauthRequired):
        await manager.access(ID)


async def test_expiring_token_is_refreshed_on_demand_even_with_no_refresh_margin(setup: Setup) -> None:
    """With AMO_REFRESH_MARGIN=0 the scheduler waits for expiry, but a caller 10 s before it gets a new pair."""
    manager = setup.manager(ScriptedAmo(answer(2)), account(), margin=0)
    setup.clock.now = NOW + 3600 - 10
    pair = await manager.access(ID)
    assert pair.access_token == "access-2"
    assert setup.amo.sent == [(OLD_HOST, "refresh-1")]


class HeldAmo(ScriptedAmo):
    """amoCRM that answers only when the test lets it, and then fails in an unexpected way."""

    def __init__(self) -> None:
        super().__init__()
        self.called = asyncio.Event()
        self.go = asyncio.Event()

    async def token_from_refresh(self, base_url: str, refresh_token: str) -> dict[str, Any]:
        self.called.set()
        await self.go.wait()
        raise RuntimeError("the connection broke in a way nobody planned for")


async def test_drain_waits_for_a_refresh_in_flight_and_swallows_its_failure(setup: Setup) -> None:
    """Shutdown's drain() returns only after the refresh sent to amoCRM ended, even when it ended badly."""
    amo = HeldAmo()
    manager = setup.manager(amo, account())
    refresh = asyncio.ensure_future(manager.refresh(ID))
    await asyncio.wait_for(amo.called.wait(), 5)
    drain = asyncio.ensure_future(manager.drain())
    await asyncio.sleep(0.05)
    assert not drain.done()
    amo.go.set()
    await asyncio.wait_for(drain, 5)
    with pytest.raises(RuntimeError):
        await refresh


async def test_expired_token_that_cannot_be_refreshed_raises_the_upstream_error(setup: Setup) -> None:
    """access() on an expired pair while amoCRM fails raises that failure; the marker and the error are kept."""
    failure = UpstreamUnavailable("amoCRM failed with HTTP 502", maybe_processed=True)
    manager = setup.manager(ScriptedAmo(failure), account())
    setup.clock.now = EXPIRED
    with pytest.raises(UpstreamUnavailable):
        await manager.access(ID)
    stored = setup.stored()
    assert stored.in_flight == InFlight(fingerprint("refresh-1"), EXPIRED)
    assert stored.last_error == "amoCRM failed with HTTP 502"
    assert stored.tokens == account().tokens


async def test_transient_failure_that_surely_spent_nothing_clears_the_marker(setup: Setup) -> None:
    """A 429 never reached the token logic: the in-flight marker goes, the error is recorded, the pair stays."""
    manager = setup.manager(ScriptedAmo(UpstreamRateLimited("amoCRM answered 429")), account())
    outcome = await manager.refresh(ID)
    assert outcome.result == "transient" and isinstance(outcome.error, UpstreamRateLimited)
    stored = setup.stored()
    assert stored.in_flight is None
    assert stored.last_error == "amoCRM answered 429"
    assert stored.status == CONNECTED


async def test_rejection_other_than_revocation_names_amocrms_hint(setup: Setup) -> None:
    """A 400 is final: re-authorization needed, with amoCRM's hint as the reason, and the error kept."""
    refusal = UpstreamRejected("amoCRM rejected the request (HTTP 400): Refresh token is invalid",
                               hint="Refresh token is invalid")
    manager = setup.manager(ScriptedAmo(refusal), account())
    outcome = await manager.refresh(ID)
    assert (outcome.result, outcome.reason, outcome.error) == ("reauth", "refresh_rejected: Refresh token is invalid",
                                                               refusal)
    stored = setup.stored()
    assert (stored.status, stored.reason) == (REAUTH_REQUIRED, "refresh_rejected: Refresh token is invalid")


async def test_lost_answer_is_named_whatever_status_carries_the_revocation(setup: Setup) -> None:
    """With a marker from a lost answer, a revocation in a plain 400 also reads as 'answer lost'."""
    refusal = UpstreamRejected(f"amoCRM rejected the request (HTTP 400): {REVOKED_HINT}", hint=REVOKED_HINT)
    manager = setup.manager(ScriptedAmo(refusal), account(in_flight=InFlight(fingerprint("refresh-1"), NOW)))
    outcome = await manager.refresh(ID)
    assert outcome.reason is not None and outcome.reason.startswith("refresh_answer_lost")


async def test_revocation_is_final_and_no_new_host_is_looked_up(setup: Setup) -> None:
    """A revoked token is not a move: the api_domain is not asked, and the reason says what happened."""
    revoked = UpstreamUnauthorized(f"amoCRM refused the credentials: {REVOKED_HINT}", hint=REVOKED_HINT)
    manager = setup.manager(ScriptedAmo(revoked, where={"domain": "new.amocrm.ru"}), account())
    outcome = await manager.refresh(ID)
    assert setup.amo.lookups == []
    assert outcome.reason is not None
    assert outcome.reason.startswith("token_revoked: amoCRM revoked the refresh token")


@pytest.mark.parametrize("where", [{"subdomain": "other"}, {"domain": "old.amocrm.ru", "subdomain": "old"}],
                         ids=["no-domain", "same-host"])
async def test_lookup_that_names_no_new_host_never_resends_the_token(setup: Setup, where: dict[str, Any]) -> None:
    """After a 404, a lookup without a domain or naming the same host ends in reauth; the token is sent once."""
    manager = setup.manager(ScriptedAmo(UpstreamNotFound("amoCRM does not know this resource"), answer(2),
                                        where=where), account())
    outcome = await manager.refresh(ID)
    assert len(setup.amo.sent) == 1
    assert outcome.result == "reauth" and outcome.moved_to is None
    assert setup.stored().base_url == OLD_HOST


async def test_move_is_followed_logged_and_keeps_the_lost_answer_evidence(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """A marker from a lost answer still counts at the new host: its revocation reads as 'answer lost'."""
    caplog.set_level(logging.INFO, logger="amo_gateway.refresh")
    marker = InFlight(fingerprint("refresh-1"), NOW)
    revoked = UpstreamUnauthorized(REVOKED_HINT, hint=REVOKED_HINT)
    amo = ScriptedAmo(UpstreamNotFound("gone"), revoked, where={"domain": "new.amocrm.ru", "subdomain": "new"})
    manager = setup.manager(amo, account(in_flight=marker))
    outcome = await manager.refresh(ID)
    assert amo.sent == [(OLD_HOST, "refresh-1"), ("https://new.amocrm.ru", "refresh-1")]
    assert outcome.reason is not None and outcome.reason.startswith("refresh_answer_lost")
    assert outcome.moved_to == ("https://new.amocrm.ru", "new")
    assert (logging.WARNING, "account.moved",
            {"account": ID, "old_host": OLD_HOST, "new_host": "https://new.amocrm.ru"}) in events(caplog)


async def test_move_answer_without_a_subdomain_takes_it_from_the_new_host(setup: Setup) -> None:
    """The lookup may name only the domain: the account moves there, its subdomain read from the new host."""
    manager = setup.manager(ScriptedAmo(UpstreamNotFound("gone"), answer(2), where={"domain": "new.amocrm.ru"}),
                            account())
    outcome = await manager.refresh(ID)
    assert outcome.result == "refreshed"
    stored = setup.stored()
    assert (stored.base_url, stored.subdomain) == ("https://new.amocrm.ru", "new")


async def test_each_refresh_result_is_logged_once_with_its_level_and_fields(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """refresh.ok (info, refresh fingerprint), refresh.transient (warning), refresh.reauth_required (error)."""
    caplog.set_level(logging.INFO, logger="amo_gateway.refresh")
    revoked = UpstreamUnauthorized(REVOKED_HINT, hint=REVOKED_HINT)
    failure = UpstreamUnavailable("amoCRM failed with HTTP 502")
    manager = setup.manager(ScriptedAmo(answer(2), failure, revoked), account())
    seen: list[Outcome] = []
    manager.observers.append(seen.append)
    for step in (0, 3100, 0):  # the new pair is due again 3100 s later; a failed refresh leaves it due
        setup.clock.now += step
        await manager.refresh(ID)
    reason = setup.stored().reason
    assert events(caplog) == [
        (logging.INFO, "refresh.ok", {"account": ID, "expires_at": round(DUE + 3600), "refresh_fp": fingerprint(
            "refresh-2")}),
        (logging.WARNING, "refresh.transient", {"account": ID, "error": "upstream_unavailable",
                                                "detail": "amoCRM failed with HTTP 502"}),
        (logging.ERROR, "refresh.reauth_required", {"account": ID, "reason": reason}),
    ]
    assert [o.result for o in seen] == ["refreshed", "transient", "reauth"]


def _data(*accounts: Account) -> VaultData:
    return VaultData(accounts={a.account_id: a for a in accounts})


def test_claim_passes_over_accounts_it_cannot_refresh_and_claims_the_due_one_after_them() -> None:
    """Missing, pairless, long-lived, reauth and fresh accounts are skipped, not the end of the batch."""
    fresh_pair = TokenPair("a", "r", expires_at=DUE + 3600, obtained_at=DUE)
    data = _data(Account("no-pair", OLD_HOST), account(account_id="long", long_lived=True),
                 account(account_id="reauth", status=REAUTH_REQUIRED), account(account_id="fresh", tokens=fresh_pair),
                 account(account_id="no-refresh", tokens=TokenPair("a", None, NOW + 3600, NOW)), account())
    ids = ["nobody", "no-pair", "long", "reauth", "fresh", "no-refresh", ID]
    claims = _claim(data, ids, DUE, 600, None)
    assert not isinstance(claims, Unchanged)
    assert [(a.account_id, previous) for a, previous in claims] == [(ID, None)]
    assert data.accounts[ID].in_flight == InFlight(fingerprint("refresh-1"), DUE)


def test_claim_with_nothing_to_do_asks_for_no_write() -> None:
    """When no account is due the claim says Unchanged, so the vault file is not rewritten."""
    claims = _claim(_data(account()), [ID, "nobody"], NOW, 600, None)
    assert isinstance(claims, Unchanged) and claims.value == []


def test_apply_stores_every_result_even_after_a_forgotten_account() -> None:
    """An account disconnected meanwhile is skipped; the outcomes after it are still stored."""
    data = _data(account())
    pair = TokenPair("access-2", "refresh-2", DUE + 3600, DUE)
    stored = _apply(data, [Outcome("gone", "refreshed", pair=pair), Outcome(ID, "refreshed", pair=pair)], 0.0)
    assert set(stored) == {ID} and "gone" not in data.accounts
    assert data.accounts[ID].tokens == pair


async def test_an_expired_token_is_never_handed_out_when_someone_elses_refresh_is_not_visible(setup: Setup) -> None:
    """access() after two rounds of 'skipped' (another replica refreshed, this view never caught up: a lost
    LISTEN, a database restart): it reads the backend once more and, still seeing only the expired pair,
    refuses with 503 state_unavailable instead of returning it (found by tests/test_replicas.py: a token
    served 0.87 s past its exp)."""
    manager = setup.manager(ScriptedAmo(), account())
    skipped: list[str | None] = []
    reloads: list[bool] = []

    async def skip(account_id: str, *, seen: str | None = None) -> Outcome:
        skipped.append(seen)
        return Outcome(account_id, "skipped", setup.stored())

    original_reload = manager.store.reload

    async def reload() -> Any:
        reloads.append(True)
        return await original_reload()

    manager.refresh = skip  # type: ignore[method-assign]
    manager.store.reload = reload  # type: ignore[method-assign]
    setup.clock.now = NOW + 3601  # the stored pair expired a second ago
    with pytest.raises(StateUnavailable) as refused:
        await manager.access(ID)
    assert str(refused.value) == ("no unexpired access token is visible yet (another process is refreshing it, or"
                                  " the shared state is out of reach); retry shortly")
    assert skipped == ["access-1", "access-1"] and reloads and setup.amo.sent == []
    setup.vault.update(lambda data: data.accounts.__setitem__(ID, account(tokens=TokenPair(
        "access-9", "refresh-9", expires_at=NOW + 7200, obtained_at=NOW + 3600))))
    assert (await manager.access(ID)).access_token == "access-9"  # once the new pair is visible, it is served


async def test_a_token_still_valid_for_a_moment_is_handed_out_without_rereading_the_backend(setup: Setup) -> None:
    """The last check is exact (no leeway): after two 'skipped' rounds a pair valid for half a second more is
    served, not refused, and the backend is not read again for it; one that the re-read shows valid is served."""
    manager = setup.manager(ScriptedAmo(), account())
    await manager.connected(ID)  # the store has read the file: from here a read comes from its copy
    reloads: list[bool] = []
    original_reload = manager.store.reload
    swap: list[TokenPair] = []

    async def skip(account_id: str, *, seen: str | None = None) -> Outcome:
        return Outcome(account_id, "skipped", setup.stored())

    async def reload() -> Any:
        reloads.append(True)
        if swap:  # the other process's refresh becomes visible on this read
            setup.vault.update(lambda data: data.accounts.__setitem__(ID, account(tokens=swap[-1])))
        return await original_reload()

    manager.refresh = skip  # type: ignore[method-assign]
    manager.store.reload = reload  # type: ignore[method-assign]
    setup.clock.now = NOW + 3600 - 0.5  # inside every leeway, not yet expired
    assert (await manager.access(ID)).access_token == "access-1"
    assert reloads == []
    setup.clock.now = NOW + 3601  # expired; the re-read finds a pair valid for half a second more
    swap.append(TokenPair("access-2", "refresh-2", expires_at=NOW + 3601.5, obtained_at=NOW + 1))
    assert (await manager.access(ID)).access_token == "access-2"
    assert reloads


class RefusingDisk(Store):
    """The vault whose claim write the disk refuses (full, or not writable)."""

    def __init__(self, vault: Vault, err: OSError) -> None:
        super().__init__(vault)
        self.err = err

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        raise self.err


@pytest.mark.parametrize(("err", "result", "kind", "says"), [
    (OSError(errno.ENOSPC, "No space left on device"), "refused_disk_full", VaultFull,
     "the vault's disk has no room to store a refreshed pair: the refresh was not sent to amoCRM and the current "
     "pair is kept; free some space"),
    (OSError(errno.EACCES, "Permission denied"), "refused_vault_unwritable", VaultError,
     "the vault could not be written (Permission denied): the refresh was not sent to amoCRM and the current pair "
     "is kept"),
])
async def test_a_claim_the_disk_refuses_sends_nothing_and_says_why_for_every_account(
        setup: Setup, caplog: pytest.LogCaptureFixture, err: OSError, result: str, kind: type[VaultError],
        says: str) -> None:
    """No room (or no write access) for the in-flight marker: no token leaves, each account is reported refused."""
    caplog.set_level(logging.INFO, logger="amo_gateway.refresh")
    setup.manager(ScriptedAmo(), account())
    setup.vault.update(lambda data: data.accounts.__setitem__("43", account(account_id="43")))
    amo = ScriptedAmo(answer(2), answer(3))
    manager = TokenManager(RefusingDisk(setup.vault, err), amo, setup.locks, setup.clock,  # type: ignore[arg-type]
                           margin=600)
    seen: list[Outcome] = []
    manager.observers.append(seen.append)
    with pytest.raises(VaultError) as raised:
        await manager.refresh_due([ID, "43"])
    assert type(raised.value) is kind and raised.value.detail == says
    assert amo.sent == []
    assert seen == [Outcome(ID, result), Outcome("43", result)]
    assert events(caplog) == [(logging.ERROR, f"refresh.{result}", {"accounts": f"{ID},43", "error": err.strerror,
                                                                   "vault": str(setup.vault.path)})]


LONG_HOST = "x" * 250 + ".attacker.example"


@pytest.mark.parametrize(("changes", "where", "role", "logged", "lookups"), [
    ({"api_domain": "api.attacker.example"}, {"domain": "new.amocrm.ru"}, "api_domain", "api.attacker.example", 0),
    ({}, {"domain": "new.attacker.example", "subdomain": "new"}, "new_host", "new.attacker.example", 1),
    ({}, {"domain": LONG_HOST}, "new_host", LONG_HOST[:253], 1),
], ids=["api-domain", "new-host", "long-host"])
async def test_a_host_outside_the_allowed_base_domains_is_never_contacted_and_is_logged(
        setup: Setup, caplog: pytest.LogCaptureFixture, changes: dict[str, Any], where: dict[str, Any], role: str,
        logged: str, lookups: int) -> None:
    """api_domain comes from an unverified JWT claim, the lookup's answer from that host: neither may receive a
    token unless it is `{sub}.{allowed base domain}`; the refusal is logged with the host, cut at 253 characters."""
    caplog.set_level(logging.INFO, logger="amo_gateway.refresh")
    manager = setup.manager(ScriptedAmo(UpstreamNotFound("gone"), answer(2), where=where), account(**changes))
    outcome = await manager.refresh(ID)
    assert setup.amo.sent == [(OLD_HOST, "refresh-1")] and len(setup.amo.lookups) == lookups
    assert outcome.result == "reauth" and outcome.moved_to is None
    assert setup.stored().base_url == OLD_HOST
    refused = [e for e in events(caplog) if e[1] == "account.move_refused"]
    assert refused == [(logging.WARNING, "account.move_refused", {
        "account": ID, "role": role, "host": logged,
        "detail": "not an amoCRM/Kommo host from AMO_ALLOWED_BASE_DOMAINS; account left as it was"})]


async def test_a_lookup_that_names_no_domain_refuses_no_host(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """No domain in the answer means no move: nothing is contacted, and no host is reported as refused."""
    caplog.set_level(logging.INFO, logger="amo_gateway.refresh")
    manager = setup.manager(ScriptedAmo(UpstreamNotFound("gone"), answer(2), where={"subdomain": "other"}), account())
    outcome = await manager.refresh(ID)
    assert outcome.result == "reauth" and setup.amo.sent == [(OLD_HOST, "refresh-1")]
    assert [e[1] for e in events(caplog) if e[1].startswith("account.")] == []


class CountingAmo(ScriptedAmo):
    """amoCRM answering every refresh after a pause, counting how many are in flight at once."""

    def __init__(self, pause: float = 0.02) -> None:
        super().__init__()
        self.pause = pause
        self.in_flight = 0
        self.most = 0
        self.n = 1

    async def token_from_refresh(self, base_url: str, refresh_token: str) -> dict[str, Any]:
        self.sent.append((base_url, refresh_token))
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(self.pause)
        finally:
            self.in_flight -= 1
        self.n += 1
        return answer(self.n)


def _many(setup: Setup, count: int) -> list[str]:
    """`count` connected accounts, all due at the setup's clock."""
    ids = [str(100 + i) for i in range(count)]

    def add(data: VaultData) -> None:
        for account_id in ids:
            data.accounts[account_id] = account(account_id=account_id)

    setup.vault.update(add)
    return ids


async def test_a_storm_in_batches_keeps_one_bound_on_amocrm_calls_across_its_batches(setup: Setup) -> None:
    """Two batches run at once, but the calls to amoCRM in flight stay within BATCH_CONCURRENCY in all."""
    from amo_gateway.manager import BATCH_CONCURRENCY

    amo = CountingAmo()
    manager = setup.manager(amo)
    manager.batch_size = BATCH_CONCURRENCY  # each batch alone could fill the bound
    ids = _many(setup, 4 * BATCH_CONCURRENCY)
    outcomes = await manager.refresh_due(ids)
    assert [o.result for o in outcomes].count("refreshed") == len(ids)
    assert amo.most == BATCH_CONCURRENCY


async def test_a_failing_batch_is_raised_only_after_every_other_batch_stored_its_answers(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """One batch's store fails at once; the other batch's answers (spent tokens) are stored before the raise."""
    amo = CountingAmo(pause=0.2)
    manager = setup.manager(amo)
    manager.batch_size = 2
    ids = _many(setup, 4)
    real_claim = manager.store.claim

    async def claim(account_ids: list[str], *args: Any, **kwargs: Any) -> Any:
        if account_ids[0] == ids[0]:
            raise VaultError("the first batch's claim fails")
        return await real_claim(account_ids, *args, **kwargs)

    monkeypatch.setattr(manager.store, "claim", claim)
    with pytest.raises(VaultError, match="the first batch's claim fails"):
        await manager.refresh_due(ids)
    stored = setup.vault.read()[0].accounts
    refresh_tokens = {a: stored[a].tokens.refresh_token for a in ids}  # type: ignore[union-attr]
    assert sorted(refresh_tokens[a] for a in ids[2:]) == ["refresh-2", "refresh-3"]
    assert [refresh_tokens[a] for a in ids[:2]] == ["refresh-1", "refresh-1"]


async def test_a_transient_failure_is_stored_with_the_time_failing_began(setup: Setup) -> None:
    """The outcomes are stored at the manager's clock: the first failure's time is what /accounts and the
    alerts count the outage from."""
    manager = setup.manager(ScriptedAmo(UpstreamUnavailable("amoCRM failed with HTTP 502")), account())
    outcome = await manager.refresh(ID)
    assert outcome.result == "transient"
    assert setup.stored().failing_since == DUE


async def test_the_batch_size_given_at_construction_splits_a_storm(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL passes a batch size (backends/__init__.py): 4 due accounts in batches of 2 are 2 claims."""
    amo = CountingAmo(pause=0)
    manager = TokenManager(Store(setup.vault), amo, setup.locks, setup.clock, margin=600,  # type: ignore[arg-type]
                           batch_size=2)
    ids = _many(setup, 4)
    claimed: list[list[str]] = []
    real_claim = manager.store.claim

    async def claim(account_ids: list[str], *args: Any, **kwargs: Any) -> Any:
        claimed.append(list(account_ids))
        return await real_claim(account_ids, *args, **kwargs)

    monkeypatch.setattr(manager.store, "claim", claim)
    outcomes = await manager.refresh_due(ids)
    assert [o.result for o in outcomes].count("refreshed") == 4
    assert sorted(claimed) == [ids[:2], ids[2:]]
