"""The per-account sliding-window limiter: unit behaviour, and 7 rps held under a burst as amoCRM counts it."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from amo_gateway.errors import QueueFull
from amo_gateway.ratelimit import Limiters, SlidingWindowLimiter
from tests.conftest import ACCOUNT_ID, RigFactory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from _harness import max_in_window  # counted as the evidence scripts count it


async def test_no_window_ever_holds_more_than_the_limit() -> None:
    """Fifteen concurrent acquisitions under limit 3 per 0.2 s: any 0.2 s span holds at most 3 of them."""
    limiter = SlidingWindowLimiter(3, 100, window=0.2)
    stamps: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        stamps.append(time.monotonic())

    await asyncio.gather(*(one() for _ in range(15)))
    assert max_in_window(stamps, 0.2) == 3
    assert stamps[-1] - stamps[0] >= 0.8  # four full windows had to pass, no burst at a window's edges


async def test_waiters_are_served_in_arrival_order() -> None:
    """Callers queue fairly: they get their slots in the order they asked."""
    limiter = SlidingWindowLimiter(1, 100, window=0.02)
    order: list[int] = []

    async def one(i: int) -> None:
        await limiter.acquire()
        order.append(i)

    tasks = []
    for i in range(8):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0)  # each has called acquire() before the next starts
    await asyncio.gather(*tasks)
    assert order == list(range(8))


async def test_full_queue_refuses_with_retry_after() -> None:
    """Beyond `queue` waiters the limiter raises QueueFull (429) with a positive Retry-After."""
    limiter = SlidingWindowLimiter(1, 2, window=10)
    await limiter.acquire()
    waiting = [asyncio.create_task(limiter.acquire()) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull) as caught:
        await limiter.acquire()
    assert caught.value.status == 429 and caught.value.retry_after is not None and caught.value.retry_after >= 1
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert limiter.waiting == 0


def test_limiters_are_per_account() -> None:
    """Each account has its own budget."""
    limiters = Limiters(7, 10)
    assert limiters.get("1") is limiters.get("1")
    assert limiters.get("1") is not limiters.get("2")


async def test_burst_from_many_callers_holds_7_rps_at_the_sandbox(make_rig: RigFactory) -> None:
    """21 concurrent proxied GETs from two consumers and the operator: ≤ 7 in any second, zero 429s, all 200."""
    rig = await make_rig(run_refresher=False)
    await rig.connect()
    callers = [{"Authorization": "Bearer consumer-secret-1"}, {"Authorization": "Bearer consumer-secret-2"}, rig.admin]

    async def one(i: int) -> int:
        resp = await rig.client.get(rig.url(f"/proxy/api/v4/leads?n={i}"), headers=callers[i % 3])
        return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(21)))
    assert statuses == [200] * 21
    assert rig.sandbox.max_requests_in_window(ACCOUNT_ID) <= 7
    assert rig.sandbox.rate_limited == 0


async def test_full_proxy_queue_answers_429_with_retry_after(make_rig: RigFactory) -> None:
    """With rate 1 and a queue of 2, a burst of 6 gets some JSON 429s with Retry-After; amoCRM sees no 429."""
    rig = await make_rig(run_refresher=False, rate_limit=1, proxy_queue=2)
    await rig.connect()

    async def one() -> tuple[int, str | None, dict[str, str] | None]:
        resp = await rig.client.get(rig.url("/proxy/api/v4/leads"), headers=rig.admin)
        body = await resp.json() if resp.status == 429 else None
        return resp.status, resp.headers.get("Retry-After"), body

    results = await asyncio.gather(*(one() for _ in range(6)))
    refused = [r for r in results if r[0] == 429]
    assert refused and all(r[1] and int(r[1]) >= 1 and r[2] and r[2]["error"] == "rate_limited" for r in refused)
    assert {r[0] for r in results} == {200, 429}
    assert rig.sandbox.rate_limited == 0
