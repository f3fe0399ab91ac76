"""The circuit breaker: amoCRM's 403 (the account ban) stops calls until a cool-down, then one probe."""

from __future__ import annotations

import asyncio

import pytest

from amo_gateway.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from amo_gateway.errors import AmoBanned
from tests.conftest import ACCOUNT_ID, RigFactory


class Ticks:
    """A hand-moved clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_403_opens_cooldown_half_opens_one_probe_and_success_closes() -> None:
    """closed → open on 403; refused while cooling; one probe when half-open; a 200 closes it."""
    clock = Ticks()
    breaker = Breaker("1", cooldown=30, clock=clock)
    breaker.before_call()
    breaker.after_call(403)
    assert breaker.state == OPEN
    with pytest.raises(AmoBanned) as caught:
        breaker.before_call()
    assert caught.value.status == 503 and caught.value.code == "amocrm_ban" and caught.value.retry_after == 31
    clock.now += 30
    breaker.before_call()  # the probe
    assert breaker.state == HALF_OPEN
    with pytest.raises(AmoBanned):
        breaker.before_call()  # only one probe at a time
    breaker.after_call(200)
    assert breaker.state == CLOSED


def test_probe_meeting_403_reopens_and_a_lost_probe_frees_the_slot() -> None:
    """A 403 probe restarts the cool-down; a probe with no answer lets the next caller probe."""
    clock = Ticks()
    breaker = Breaker("1", cooldown=5, clock=clock)
    breaker.after_call(403)
    clock.now += 5
    breaker.before_call()
    breaker.call_failed()
    breaker.before_call()
    breaker.after_call(403)
    assert breaker.state == OPEN
    with pytest.raises(AmoBanned):
        breaker.fail_fast()


async def test_banned_account_opens_the_breaker_and_callers_get_503_naming_the_ban(make_rig: RigFactory) -> None:
    """The sandbox bans the account: one 403 reaches the caller, the next gets 503 amocrm_ban without a call."""
    rig = await make_rig(run_refresher=False, breaker_cooldown=0.3)
    await rig.connect()
    rig.sandbox.banned.add(ACCOUNT_ID)
    first = await rig.client.get(rig.url("/proxy/api/v4/leads"), headers=rig.admin)
    assert first.status == 403
    calls = rig.sandbox.hits["api"]
    second = await rig.client.get(rig.url("/proxy/api/v4/leads"), headers=rig.admin)
    body = await second.json()
    assert (second.status, body["error"]) == (503, "amocrm_ban")
    assert "403" in body["detail"] and int(second.headers["Retry-After"]) >= 1
    assert rig.sandbox.hits["api"] == calls
    rig.sandbox.banned.clear()
    await asyncio.sleep(0.35)
    probe = await rig.client.get(rig.url("/proxy/api/v4/leads"), headers=rig.admin)
    assert probe.status == 200
    assert (await rig.client.get(rig.url("/proxy/api/v4/leads"), headers=rig.admin)).status == 200
