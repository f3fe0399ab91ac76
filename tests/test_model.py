"""A Hypothesis state machine over the token manager and a real sandbox: the vault never holds a dead token.

Rules: refresh success, revoked token, upstream 5xx, lost answer, restart, key rotation, disconnect,
reconnect and concurrent readers, in any order. Two token managers, each with its own Store and Vault
object over the one file (as two processes would have), take turns, so every decision must come from the
file re-read under its lock, never from a cached copy. The machine owns its event loop; the sandbox listens
on a loopback socket inside it and shares the machine's fake clock. Invariants after every step: the
vault's refresh token is the one the sandbox accepts, or the account is marked reauth_required, or (after
a lost answer) it is marked in flight for exactly that token, which the next attempt turns into
reauth_required; and, per token, only a token marked in flight after a lost answer is ever presented to
amoCRM a second time, and only once.

The quick run (make test) is randomized: its seed is printed in pytest's header (`model seed: N`) and
`AMO_MODEL_SEED=N` replays it. It checks that every rule ran several times.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from amo_gateway.amo_client import AmoClient
from amo_gateway.flows import Flows
from amo_gateway.locks import RefreshLocks
from amo_gateway.manager import TokenManager
from amo_gateway.sandbox import SANDBOX_STATE, SandboxAccount, SandboxConfig, create_sandbox_app
from amo_gateway.settings import Settings
from amo_gateway.store import Store
from amo_gateway.tokens import REAUTH_REQUIRED, Account, fingerprint, pair_from_response
from amo_gateway.vault import KeyRing, Vault
from tests.conftest import MODEL_SEED as SEED
from tests.conftest import FakeClock

ACCOUNT = 31920194
ACC = str(ACCOUNT)
TTL = 600
CLIENT_ID = "2912780f-a1e4-4d5d-a069-ee01422d8bef"
REDIRECT = "http://127.0.0.1:9/api/v1/integrations/amo-crm/callback"  # never called: codes are redeemed directly
SIDES = st.integers(min_value=0, max_value=1)  # which of the two "processes" acts
RULE_HITS: Counter[str] = Counter()  # rules run in this pytest process, for the coverage check


class GatewayModel(RuleBasedStateMachine):
    """The gateway's token core against the sandbox, driven rule by rule on a loop the machine owns."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="amo-model-"))
        self.clock = FakeClock()
        self.secret = secrets.token_hex(16)
        self.keys = KeyRing([Fernet.generate_key().decode()])
        self.lost_tokens: set[str] = set()  # refresh tokens marked in flight when their answer was lost
        self.run(self._start())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _start(self) -> None:
        config = SandboxConfig(client_id=CLIENT_ID, client_secret=self.secret, redirect_uri=REDIRECT,
                               accounts=[SandboxAccount(ACCOUNT, "demo", {}, set(), "Demo")], access_ttl=TTL,
                               send_referer=False, clock=self.clock.time)
        app = create_sandbox_app(config)
        self.sandbox = app[SANDBOX_STATE]
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession()
        self._build()

    def _build(self) -> None:
        """The gateway's token core over the vault file, twice: what two process starts build.

        The two sides share one lock table: within one process POSIX record locks do not exclude, so real
        cross-process exclusion is proven with real processes (test_lock_discipline.py, test_multiprocess.py).
        """
        path = self.tmp / "vault" / "vault.enc"
        Vault(path, self.keys).prepare()
        self.locks = RefreshLocks(self.tmp / "vault" / "vault.enc.refresh.lock")
        client = AmoClient(self.session, client_id=CLIENT_ID, client_secret=self.secret, redirect_uri=REDIRECT,
                           timeout=5)
        settings_ = Settings.model_validate({"client_id": CLIENT_ID, "client_secret": self.secret,
                                             "base_url": self.base_url, "vault_path": path})
        self.managers: list[TokenManager] = []
        self.flows: list[Flows] = []
        for _ in range(2):
            store = Store(Vault(path, self.keys))
            self.managers.append(TokenManager(store, client, self.locks, self.clock, margin=60))
            self.flows.append(Flows(settings_, store, client, self.clock))
        self.store = self.managers[0].store

    def teardown(self) -> None:
        self.locks.close()
        self.run(self.session.close())
        self.run(self.runner.cleanup())
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # Model state, read from the vault itself.
    def account(self) -> Account | None:
        return self.store.vault.load().accounts.get(ACC)

    def connected(self) -> bool:
        account = self.account()
        return account is not None and account.status != REAUTH_REQUIRED

    def needs_connect(self) -> bool:
        return not self.connected()

    def spent_in_flight(self) -> bool:
        """The stored token was sent and spent by amoCRM, its answer lost (the sandbox knows; the vault may not)."""
        account = self.account()
        if account is None or account.in_flight is None or account.tokens is None:
            return False
        return self.sandbox.refresh_account(account.tokens.refresh_token or "") is None

    # Rules.
    @initialize()
    def connect_first(self) -> None:
        self.run(self._connect())

    async def _connect(self) -> None:
        """The callback's work: redeem a fresh code and store the first pair of a new chain."""
        code = self.sandbox.issue_code(ACCOUNT)
        body = await self.managers[0].client.token_from_code(self.base_url, code)
        pair = pair_from_response(body, self.clock.time())
        account = Account(account_id=ACC, base_url=self.base_url, connected_at=self.clock.time()).with_pair(pair)
        await self.managers[1].store.update(lambda data: data.accounts.__setitem__(ACC, account))

    @precondition(needs_connect)
    @rule()
    def reconnect(self) -> None:
        """An operator repairs a disconnected or reauth_required account."""
        RULE_HITS["reconnect"] += 1
        self.run(self._connect())

    @precondition(connected)
    @rule(seconds=st.sampled_from([TTL - 30, TTL + 5, 3 * TTL]), side=SIDES)
    def time_passes_and_refresher_runs(self, seconds: int, side: int) -> None:
        """The scheduler's refresh once due: a new pair, stored, the old refresh token spent."""
        RULE_HITS["time_passes_and_refresher_runs"] += 1
        self.clock.advance(seconds)
        judged_now = self.spent_in_flight()
        outcome = self.run(self.managers[side].refresh_due([ACC]))[0]
        assert outcome.result == ("reauth" if judged_now else "refreshed"), outcome

    @precondition(connected)
    @rule(side=SIDES)
    def upstream_fails_with_5xx(self, side: int) -> None:
        """A 503 from amoCRM keeps the old pair and its refresh token."""
        RULE_HITS["upstream_fails_with_5xx"] += 1
        self.clock.advance(TTL)
        before = self.account()
        self.sandbox.fail_next["token"] = [503]
        outcome = self.run(self.managers[side].refresh_due([ACC]))[0]
        after = self.account()
        assert outcome.result == "transient"
        assert before is not None and after is not None and before.tokens is not None and after.tokens is not None
        assert after.tokens.refresh_token == before.tokens.refresh_token

    @precondition(connected)
    @rule(side=SIDES)
    def user_revokes_the_integration(self, side: int) -> None:
        """amoCRM revokes the token: the next refresh marks the account reauth_required, once."""
        RULE_HITS["user_revokes_the_integration"] += 1
        self.sandbox.revoke(ACCOUNT)
        self.clock.advance(TTL)
        outcome = self.run(self.managers[side].refresh_due([ACC]))[0]
        assert outcome.result == "reauth"
        account = self.account()
        assert account is not None and account.status == REAUTH_REQUIRED

    @precondition(connected)
    @rule(side=SIDES)
    def refresh_answer_is_lost(self, side: int) -> None:
        """amoCRM spends the token but the answer never arrives: the in-flight marker stays."""
        RULE_HITS["refresh_answer_is_lost"] += 1
        self.clock.advance(TTL)
        judged_now = self.spent_in_flight()
        self.sandbox.drop_next_refresh = 1
        outcome = self.run(self.managers[side].refresh_due([ACC]))[0]
        self.sandbox.drop_next_refresh = 0  # unused when the earlier lost answer was judged first
        account = self.account()
        assert account is not None
        if judged_now:  # the spent token goes back once, and amoCRM's "revoked" proves the loss
            assert outcome.result == "reauth" and (account.reason or "").startswith("refresh_answer_lost")
        else:
            assert outcome.result == "transient" and account.in_flight is not None
            assert account.tokens is not None and account.tokens.refresh_token is not None
            assert account.in_flight.refresh_fp == fingerprint(account.tokens.refresh_token)
            self.lost_tokens.add(account.tokens.refresh_token)

    @rule()
    def restart(self) -> None:
        """New processes over the same vault file."""
        RULE_HITS["restart"] += 1
        self.locks.close()
        self._build()

    @rule()
    def rotate_vault_key(self) -> None:
        """Re-encrypt under a new primary key; the file then opens with the new key alone."""
        RULE_HITS["rotate_vault_key"] += 1
        new = self.keys.rotated()
        self.run(asyncio.to_thread(self.store.vault.reencrypt, new))
        self.keys = new
        Vault(self.store.vault.path, KeyRing(new.keys[:1])).load()  # a fresh reader: no cached copy to lean on
        self.restart()

    @precondition(lambda self: self.account() is not None)
    @rule(side=SIDES)
    def amocrm_sends_disconnect(self, side: int) -> None:
        """The user removes the integration: amoCRM kills the tokens, and its signed disconnect forgets the account."""
        RULE_HITS["amocrm_sends_disconnect"] += 1
        self.sandbox.revoke(ACCOUNT)
        self.clock.advance(1)  # the probe of the token counts against amoCRM's 7 rps, which runs on this clock
        signature = hmac.new(self.secret.encode(), f"{CLIENT_ID}|{ACC}".encode(), hashlib.sha256).hexdigest()
        assert self.run(self.flows[side].disconnect(ACC, CLIENT_ID, signature)) is True
        assert self.account() is None

    @precondition(connected)
    @rule(readers=st.integers(min_value=2, max_value=12))
    def concurrent_readers_share_one_refresh(self, readers: int) -> None:
        """Many access() calls at an expired token, from both sides: one refresh at most, one pair for all."""
        RULE_HITS["concurrent_readers_share_one_refresh"] += 1
        self.clock.advance(TTL + 1)
        before = self.sandbox.refresh_attempts
        pending = self.account() is not None and self.account().in_flight is not None  # type: ignore[union-attr]
        results = self.run(self._readers(readers))
        assert self.sandbox.refresh_attempts - before <= 1
        pairs = {r.access_token for r in results if not isinstance(r, BaseException)}
        assert len(pairs) <= 1
        assert pending or len(pairs) == 1, results  # only a lost answer may turn readers away

    async def _readers(self, readers: int) -> list[Any]:
        return list(await asyncio.gather(*(self.managers[i % 2].access(ACC) for i in range(readers)),
                                         return_exceptions=True))

    # Invariants.
    @invariant()
    def vault_holds_the_live_token_or_says_why_not(self) -> None:
        """Live token, or reauth_required, or marked in flight for exactly the stored (spent) token."""
        account = self.account()
        if account is None or account.status == REAUTH_REQUIRED:
            return
        assert account.tokens is not None
        stored = account.tokens.refresh_token
        if stored == self.sandbox.live_refresh_token(ACCOUNT):
            return
        assert account.in_flight is not None and account.in_flight.refresh_fp == fingerprint(stored)

    @invariant()
    def no_refresh_token_is_sent_twice_except_to_judge_a_lost_answer(self) -> None:
        """Per token: a second presentation only for a token marked in flight after a lost answer, once."""
        for token, times in self.sandbox.refresh_tokens_presented.items():
            if times > 1:
                assert token in self.lost_tokens, f"token {fingerprint(token)} presented {times} times, never lost"
                assert times == 2, f"lost token {fingerprint(token)} presented {times} times"


EVIDENCE = os.environ.get("AMO_MODEL_EXAMPLES")
QUICK = settings(max_examples=60, stateful_step_count=30, deadline=None, derandomize=False, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
MIN_HITS = 3  # the quick run must exercise every rule at least this often to count


class QuickGatewayModel(GatewayModel):
    """The machine as make test runs it: randomized, with the seed printed in pytest's header."""


seed(SEED)(QuickGatewayModel)


def test_token_core_keeps_the_live_refresh_token() -> None:
    """Any sequence of refreshes, faults, restarts on two sides: no dead token, no token sent twice."""
    RULE_HITS.clear()
    run_state_machine_as_test(QuickGatewayModel, settings=QUICK)
    rare = {name: RULE_HITS[name] for name in RULES if RULE_HITS[name] < MIN_HITS}
    assert not rare, f"seed {SEED}: rules run fewer than {MIN_HITS} times: {rare}"


RULES = ("reconnect", "time_passes_and_refresher_runs", "upstream_fails_with_5xx", "user_revokes_the_integration",
         "refresh_answer_is_lost", "restart", "rotate_vault_key", "amocrm_sends_disconnect",
         "concurrent_readers_share_one_refresh")


class LongGatewayModel(GatewayModel):
    """The same machine, many more and longer runs (make evidence)."""


LongGatewayModel.TestCase.settings = settings(
    max_examples=int(EVIDENCE or 300), stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_token_core_keeps_the_live_refresh_token_long = pytest.mark.evidence(LongGatewayModel.TestCase)
