"""The store's read path: strangers' misses are served from the cached snapshot, not by re-reading the vault."""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

from amo_gateway.flows import _digest
from amo_gateway.tokens import PendingState
from amo_gateway.typedefs import STORE
from amo_gateway.vault import Vault
from tests.conftest import ACCOUNT_ID, Rig

MISSES = 50


def _count_reads(vault: Vault) -> list[int]:
    """Wrap this vault object's file reads with a counter (the instance only, no global patch)."""
    calls = [0]
    original = vault.load

    def counting() -> Any:
        calls[0] += 1
        return original()

    vault.load = counting  # type: ignore[method-assign]
    return calls


async def test_random_account_misses_do_not_reread_the_vault(rig: Rig) -> None:
    """N unauthenticated /test?account=<random> answer 404 from the snapshot, with no vault read per miss; an
    account another process adds afterwards is still found (its write changed the file's signature)."""
    await rig.connect()
    reads = _count_reads(rig.app[STORE].vault)
    for _ in range(MISSES):
        resp = await rig.client.get(rig.url("/test"), params={"account": secrets.token_hex(8)})
        assert resp.status == 404
    assert reads[0] <= 1

    def add(data: Any) -> None:
        data.accounts["777"] = replace(data.accounts[str(ACCOUNT_ID)], account_id="777", subdomain="other")

    rig.vault().update(add)  # a second writer, as another gateway process would be
    resp = await rig.client.get(rig.url("/token"), params={"account": "other"}, headers=rig.admin)
    assert resp.status == 200, await resp.text()


async def test_random_state_misses_do_not_reread_the_vault(rig: Rig) -> None:
    """N forged /callback?state=<random> answer 400 invalid_state without reading the vault each time; a state
    another process issues afterwards is still accepted."""
    await rig.connect()
    reads = _count_reads(rig.app[STORE].vault)
    for _ in range(MISSES):
        resp = await rig.client.get(rig.url("/callback"), params={"code": "x", "state": secrets.token_urlsafe(16)})
        assert resp.status == 400
    assert reads[0] <= 1
    state = secrets.token_urlsafe(32)
    pending = PendingState("authorize", 0, 4_000_000_000, "label")
    rig.vault().update(lambda data: data.states.__setitem__(_digest(state), pending))
    code = rig.sandbox.issue_code(ACCOUNT_ID)
    resp = await rig.client.get(rig.url("/callback"), params={"code": code, "state": state})
    assert resp.status == 200, await resp.text()
