"""Two gateways that share nothing but AMO_DATABASE_URL serve one account: one refresh at a time, no token twice."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import ClientTimeout
from aiohttp.test_utils import TestServer

from amo_gateway.app import create_app
from amo_gateway.serve import runner_options
from amo_gateway.typedefs import STORE
from tests.conftest import ACCOUNT_ID, RigFactory
from tests.pg import ThrowawayPostgres


async def _second_gateway(rig: Any, aiohttp_client: Any) -> Any:
    """Another app on the same settings (same database, same sandbox): a second replica."""
    app = create_app(rig.settings, keys=rig.keys)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(**runner_options(rig.settings))
    return await aiohttp_client(server)


async def test_two_gateways_on_one_database_never_send_a_refresh_token_twice(
        make_rig: RigFactory, database_url: str, aiohttp_client: Any) -> None:
    """2-second tokens, both refreshers running, /token hammered on both: the sandbox counts every reuse."""
    rig = await make_rig(database_url=database_url, refresh_margin=1, sandbox_access_ttl=2)
    await rig.connect()
    other = await _second_gateway(rig, aiohttp_client)
    clients = [rig.client, other]
    answers: list[int] = []

    async def hammer(client: Any) -> None:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            resp = await client.get(rig.url("/token"), headers=rig.admin)
            answers.append(resp.status)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(hammer(c) for c in clients for _ in range(3)))
    refreshes = sum(rig.sandbox.refresh_tokens_presented.values())
    assert rig.sandbox.refresh_tokens_reused == 0
    assert refreshes >= 4, refreshes  # the tokens really rotated, many times, under both replicas
    assert set(answers) == {200}
    account = (await other.app[STORE].reload()).accounts[str(ACCOUNT_ID)]
    assert account.status == "connected" and account.in_flight is None


async def test_a_callback_on_one_gateway_is_served_by_the_other(
        make_rig: RigFactory, database_url: str, aiohttp_client: Any) -> None:
    rig = await make_rig(database_url=database_url)
    other = await _second_gateway(rig, aiohttp_client)
    await rig.connect()
    resp = await other.get(rig.url("/token"), headers=rig.admin)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["account_id"] == str(ACCOUNT_ID)


async def test_two_gateways_proxying_a_burst_keep_amocrm_at_seven_a_second(
        make_rig: RigFactory, database_url: str, aiohttp_client: Any) -> None:
    """The 7 rps budget is the account's, not the replica's: 40 calls split over two replicas never put more
    than 7 into any one-second span at amoCRM, and both replicas' callers get through (neither starves)."""
    rig = await make_rig(database_url=database_url, rate_guard=0.05, proxy_queue=100)
    await rig.connect()
    other = await _second_gateway(rig, aiohttp_client)
    done: dict[int, list[float]] = {0: [], 1: []}
    start = time.monotonic()

    async def call(n: int, client: Any) -> None:
        resp = await client.get(rig.url("/proxy/api/v4/leads"), headers=rig.admin)
        assert resp.status == 200, await resp.text()
        done[n].append(time.monotonic() - start)

    await asyncio.gather(*(call(n % 2, (rig.client, other)[n % 2]) for n in range(40)))
    assert rig.sandbox.max_requests_in_window(ACCOUNT_ID) <= 7
    assert len(done[0]) == len(done[1]) == 20
    assert min(done[0]) < 2 and min(done[1]) < 2  # both replicas got sends in early, not one after the other


async def test_an_idempotent_retry_on_the_other_gateway_is_replayed(
        make_rig: RigFactory, database_url: str, aiohttp_client: Any) -> None:
    """A POST with Idempotency-Key through one replica, its retry through the other: amoCRM sees it once."""
    rig = await make_rig(database_url=database_url)
    await rig.connect()
    other = await _second_gateway(rig, aiohttp_client)
    url, keyed = rig.url("/proxy/api/v4/leads"), {**rig.admin, "Idempotency-Key": "create-7"}
    first = await rig.client.post(url, json=[{"name": "a"}], headers=keyed)
    second = await other.post(url, json=[{"name": "a"}], headers=keyed)
    assert (first.status, second.status) == (200, 200)
    body_one, body_two = await first.json(), await second.json()  # links name the replica that answered
    assert [lead["id"] for lead in body_one["_embedded"]["leads"]] == [
        lead["id"] for lead in body_two["_embedded"]["leads"]]
    assert second.headers["Idempotent-Replayed"] == "true"
    assert rig.sandbox.hits["api"] == 1
    misuse = await other.patch(url, json=[{"name": "a"}], headers=keyed)
    assert (misuse.status, (await misuse.json())["error"]) == (409, "idempotency_conflict")
    racing = [c.post(url, json=[{"name": "b"}], headers={**rig.admin, "Idempotency-Key": "race"})
              for c in (rig.client, other) for _ in range(3)]
    statuses = sorted([(await r.read(), r.status)[1] for r in await asyncio.gather(*racing)])
    assert rig.sandbox.hits["api"] == 2 and statuses.count(200) >= 1  # the rest replayed or told "in flight"


async def test_with_the_database_down_an_expired_token_answers_503_in_seconds(
        make_rig: RigFactory, postgres: ThrowawayPostgres) -> None:
    """Database stopped, cached token expired: /token says 503 state_unavailable within a few seconds (each
    lease statement waits 2 s for a connection), not after the pool's 10 s wait per statement; 200 once back."""
    own = ThrowawayPostgres(postgres.bindir)  # stopped and started here: not the session's shared server
    await asyncio.to_thread(own.init)
    try:
        rig = await make_rig(database_url=own.database(), sandbox_access_ttl=2, upstream_timeout=1)
        await rig.connect()
        await asyncio.to_thread(own.stop, "fast")
        await asyncio.sleep(2.2)  # the token held in memory has expired by now
        started = time.monotonic()
        resp = await rig.client.get(rig.url("/token"), headers=rig.admin, timeout=ClientTimeout(total=9))
        assert (resp.status, (await resp.json())["error"]) == (503, "state_unavailable")
        # at most two waits: behind the refresher's batch holding the account's lock, then this call's own
        assert time.monotonic() - started < 6
        await asyncio.to_thread(own.start)
        for _ in range(100):
            resp = await rig.client.get(rig.url("/token"), headers=rig.admin)
            if resp.status == 200:
                break
            await asyncio.sleep(0.1)
        assert resp.status == 200 and "Warning" not in resp.headers
        assert rig.sandbox.refresh_tokens_reused == 0
    finally:
        await asyncio.to_thread(own.destroy)
