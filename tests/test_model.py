"""A Hypothesis state machine over the token manager and a real sandbox: the vault never holds a dead token.

Rules: refresh success, revoked token, upstream 5xx, lost answer, restart, key rotation, disconnect,
reconnect and concurrent readers, in any order. The machine owns its event loop; the sandbox listens on a
loopback socket inside it and shares the machine's fake clock. Invariant after every step: the vault's
refresh token is the one the sandbox accepts, or the account is marked reauth_required, or (after a lost
answer) it is marked in flight for exactly that token, which the next attempt turns into reauth_required.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from amo_gateway.amo_client import AmoClient
from amo_gateway.flows import Flows
from amo_gateway.locks import RefreshLocks
from amo_gateway.manager import TokenManager
from amo_gateway.sandbox import SANDBOX_STATE, SandboxAccount, SandboxConfig, create_sandbox_app
from amo_gateway.settings import Settings
from amo_gateway.store import Store
from amo_gateway.tokens import REAUTH_REQUIRED, Account, fingerprint, pair_from_response
from amo_gateway.vault import KeyRing, Vault
from tests.conftest import FakeClock

ACCOUNT = 31920194
ACC = str(ACCOUNT)
TTL = 600
CLIENT_ID = "2912780f-a1e4-4d5d-a069-ee01422d8bef"
REDIRECT = "http://127.0.0.1:9/api/v1/integrations/amo-crm/callback"  # never called: codes are redeemed directly


class GatewayModel(RuleBasedStateMachine):
    """The gateway's token core against the sandbox, driven rule by rule on a loop the machine owns."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="amo-model-"))
        self.clock = FakeClock()
        self.secret = secrets.token_hex(16)
        self.keys = KeyRing([Fernet.generate_key().decode()])
        self.lost_answers = 0
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
        """The gateway's token core over the vault file: what a process start builds."""
        vault = Vault(self.tmp / "vault" / "vault.enc", self.keys)
        vault.prepare()
        self.store = Store(vault)
        self.locks = RefreshLocks(self.tmp / "vault" / "vault.enc.refresh.lock")
        client = AmoClient(self.session, client_id=CLIENT_ID, client_secret=self.secret, redirect_uri=REDIRECT,
                           timeout=5)
        self.manager = TokenManager(self.store, client, self.locks, self.clock, margin=60)
        settings_ = Settings.model_validate({"client_id": CLIENT_ID, "client_secret": self.secret,
                                             "base_url": self.base_url, "vault_path": vault.path})
        self.flows = Flows(settings_, self.store, client, self.clock)

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
        body = await self.manager.client.token_from_code(self.base_url, code)
        pair = pair_from_response(body, self.clock.time())
        account = Account(account_id=ACC, base_url=self.base_url, connected_at=self.clock.time()).with_pair(pair)
        await self.store.update(lambda data: data.accounts.__setitem__(ACC, account))

    @precondition(needs_connect)
    @rule()
    def reconnect(self) -> None:
        """An operator repairs a disconnected or reauth_required account."""
        self.run(self._connect())

    @precondition(connected)
    @rule(seconds=st.sampled_from([TTL - 30, TTL + 5, 3 * TTL]))
    def time_passes_and_refresher_runs(self, seconds: int) -> None:
        """The scheduler's refresh once due: a new pair, stored, the old refresh token spent."""
        self.clock.advance(seconds)
        judged_now = self.spent_in_flight()
        outcome = self.run(self.manager.refresh_due([ACC]))[0]
        assert outcome.result == ("reauth" if judged_now else "refreshed"), outcome

    @precondition(connected)
    @rule()
    def upstream_fails_with_5xx(self) -> None:
        """A 503 from amoCRM keeps the old pair and its refresh token."""
        self.clock.advance(TTL)
        before = self.account()
        self.sandbox.fail_next["token"] = [503]
        outcome = self.run(self.manager.refresh_due([ACC]))[0]
        after = self.account()
        assert outcome.result == "transient"
        assert before is not None and after is not None and before.tokens is not None and after.tokens is not None
        assert after.tokens.refresh_token == before.tokens.refresh_token

    @precondition(connected)
    @rule()
    def user_revokes_the_integration(self) -> None:
        """amoCRM revokes the token: the next refresh marks the account reauth_required, once."""
        self.sandbox.revoke(ACCOUNT)
        self.clock.advance(TTL)
        outcome = self.run(self.manager.refresh_due([ACC]))[0]
        assert outcome.result == "reauth"
        account = self.account()
        assert account is not None and account.status == REAUTH_REQUIRED

    @precondition(connected)
    @rule()
    def refresh_answer_is_lost(self) -> None:
        """amoCRM spends the token but the answer never arrives: the in-flight marker stays."""
        self.clock.advance(TTL)
        judged_now = self.spent_in_flight()
        self.sandbox.drop_next_refresh = 1
        outcome = self.run(self.manager.refresh_due([ACC]))[0]
        self.sandbox.drop_next_refresh = 0  # unused when the earlier lost answer was judged first
        account = self.account()
        assert account is not None
        if judged_now:  # the spent token goes back once, and amoCRM's "revoked" proves the loss
            assert outcome.result == "reauth" and (account.reason or "").startswith("refresh_answer_lost")
        else:
            self.lost_answers += 1
            assert outcome.result == "transient" and account.in_flight is not None

    @rule()
    def restart(self) -> None:
        """A new process over the same vault file."""
        self.locks.close()
        self._build()

    @rule()
    def rotate_vault_key(self) -> None:
        """Re-encrypt under a new primary key; the file then opens with the new key alone."""
        new = self.keys.rotated()
        self.run(asyncio.to_thread(self.store.vault.reencrypt, new))
        self.keys = new
        Vault(self.store.vault.path, KeyRing(new.keys[:1])).load()  # a fresh reader: no cached copy to lean on
        self.restart()

    @precondition(lambda self: self.account() is not None)
    @rule()
    def amocrm_sends_disconnect(self) -> None:
        """The user removes the integration: amoCRM kills the tokens, and its signed disconnect forgets the account."""
        self.sandbox.revoke(ACCOUNT)
        self.clock.advance(1)  # the probe of the token counts against amoCRM's 7 rps, which runs on this clock
        signature = hmac.new(self.secret.encode(), f"{CLIENT_ID}|{ACC}".encode(), hashlib.sha256).hexdigest()
        assert self.run(self.flows.disconnect(ACC, CLIENT_ID, signature)) is True
        assert self.account() is None

    @precondition(connected)
    @rule(readers=st.integers(min_value=2, max_value=12))
    def concurrent_readers_share_one_refresh(self, readers: int) -> None:
        """Many access() calls at an expired token: one refresh at most, everyone gets the same pair."""
        self.clock.advance(TTL + 1)
        before = self.sandbox.refresh_attempts
        pending = self.account() is not None and self.account().in_flight is not None  # type: ignore[union-attr]
        results = self.run(self._readers(readers))
        assert self.sandbox.refresh_attempts - before <= 1
        pairs = {r.access_token for r in results if not isinstance(r, BaseException)}
        assert len(pairs) <= 1
        assert pending or len(pairs) == 1, results  # only a lost answer may turn readers away

    async def _readers(self, readers: int) -> list[Any]:
        return list(await asyncio.gather(*(self.manager.access(ACC) for _ in range(readers)),
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
        assert self.sandbox.refresh_tokens_reused <= self.lost_answers


EVIDENCE = os.environ.get("AMO_MODEL_EXAMPLES")
GatewayModel.TestCase.settings = settings(
    max_examples=15, stateful_step_count=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow])
test_token_core_keeps_the_live_refresh_token = GatewayModel.TestCase
test_token_core_keeps_the_live_refresh_token.__doc__ = "Any sequence of refreshes, faults, restarts: no dead token."


class LongGatewayModel(GatewayModel):
    """The same machine, many more and longer runs (make evidence)."""


LongGatewayModel.TestCase.settings = settings(
    max_examples=int(EVIDENCE or 300), stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_token_core_keeps_the_live_refresh_token_long = pytest.mark.evidence(LongGatewayModel.TestCase)
