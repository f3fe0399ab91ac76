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
    """N unauthenticated /test?account=<random> answer 404 from the snapshot: no vault read per miss."""
    await rig.connect()
    reads = _count_reads(rig.app[STORE].vault)
    for _ in range(MISSES):
        resp = await rig.client.get(rig.url("/test"), params={"account": secrets.token_hex(8)})
        assert resp.status == 404
    assert reads[0] <= 1


async def test_random_state_misses_do_not_reread_the_vault(rig: Rig) -> None:
    """N forged /callback?state=<random> answer 400 invalid_state without reading the vault each time."""
    await rig.connect()
    reads = _count_reads(rig.app[STORE].vault)
    for _ in range(MISSES):
        resp = await rig.client.get(rig.url("/callback"), params={"code": "x", "state": secrets.token_urlsafe(16)})
        assert resp.status == 400
    assert reads[0] <= 1


async def test_an_account_added_by_another_process_is_still_found(rig: Rig) -> None:
    """The miss path still sees a vault another process changed: its file signature changed, so it is read."""
    await rig.connect()
    other = rig.vault()  # a second writer, as another gateway process would be

    def add(data: Any) -> None:
        data.accounts["777"] = replace(data.accounts[str(ACCOUNT_ID)], account_id="777", subdomain="other")
    other.update(add)
    resp = await rig.client.get(rig.url("/accounts"), headers=rig.admin)
    assert resp.status == 200
    resp = await rig.client.get(rig.url("/token"), params={"account": "other"}, headers=rig.admin)
    assert resp.status == 200, await resp.text()


async def test_a_state_issued_by_another_process_is_still_accepted(rig: Rig) -> None:
    """A state another process wrote a moment ago passes the state check on the miss path."""
    state = secrets.token_urlsafe(32)
    await rig.app[STORE].snapshot()  # warm the cache first, so the new state is a miss in the snapshot
    pending = PendingState("authorize", 0, 4_000_000_000, "label")
    rig.vault().update(lambda data: data.states.__setitem__(_digest(state), pending))
    code = rig.sandbox.issue_code(ACCOUNT_ID)
    resp = await rig.client.get(rig.url("/callback"), params={"code": code, "state": state})
    assert resp.status == 200, await resp.text()
