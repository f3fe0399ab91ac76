"""What else replicas on one database share: the 401 refresh budget, and the CLI tools that write state."""

from __future__ import annotations

import asyncio
from typing import Any

from amo_gateway.backends.pg_budget import SharedRefreshBudget
from amo_gateway.backends.pg_schema import migrate, open_pool
from tests.conftest import ACCOUNT_ID, RigFactory
from tests.test_pg_gateway import _second_gateway
from tests.test_proxy_hardening import CONSUMER, DENIED

ACCOUNT = str(ACCOUNT_ID)


async def test_the_401_refresh_budget_is_taken_once_by_all_replicas(database_url: str) -> None:
    """Two replicas (two pools) ask at once, ten times each: one wins; reopened, it can be taken once again."""
    pools = [await open_pool(database_url, max_size=4) for _ in range(2)]
    await migrate(pools[0])
    budgets = [SharedRefreshBudget(pool, 300) for pool in pools]
    wins = await asyncio.gather(*(b.take(ACCOUNT) for b in budgets for _ in range(10)))
    assert wins.count(True) == 1
    assert await budgets[0].take("another-account") is True  # per account
    await budgets[1].reopen(ACCOUNT)
    assert [await budgets[0].take(ACCOUNT), await budgets[1].take(ACCOUNT)] == [True, False]
    for pool in pools:
        await pool.close()


async def test_the_budget_closes_again_once_its_interval_has_passed(database_url: str) -> None:
    pool = await open_pool(database_url, max_size=1)
    await migrate(pool)
    budget = SharedRefreshBudget(pool, 0.3)
    assert await budget.take(ACCOUNT) is True and await budget.take(ACCOUNT) is False
    await asyncio.sleep(0.4)
    assert await budget.take(ACCOUNT) is True
    await pool.close()


async def test_two_replicas_behind_an_always_401_path_spend_one_budget(make_rig: RigFactory, database_url: str,
                                                                       aiohttp_client: Any) -> None:
    """20 calls to a path amoCRM always answers 401, alternating between two replicas: one refresh in all
    within the interval, not one per replica (budgets kept per replica spend two here)."""
    rig = await make_rig(run_refresher=False, database_url=database_url, rate_limit=50, sandbox_rate_limit=50)
    await rig.connect()
    other = await _second_gateway(rig, aiohttp_client)
    async with rig.client.session.post(f"{rig.sandbox_url}/_sandbox/faults",
                                       json={"unauthorized_paths": [DENIED]}) as switched:
        assert switched.status == 200
    before = rig.sandbox.refresh_attempts
    for i in range(20):
        client = other if i % 2 else rig.client
        resp = await client.get(rig.url(f"/proxy{DENIED}?i={i}"), headers=CONSUMER)
        assert resp.status == 401
    spent = rig.sandbox.refresh_attempts - before
    assert spent == 1, spent
    assert rig.sandbox.refresh_tokens_reused == 0
