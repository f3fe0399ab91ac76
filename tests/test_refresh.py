"""Refresh policy (manager.py, refresher.py) with a fake clock shared by the gateway and the sandbox."""

from __future__ import annotations

import asyncio

from amo_gateway.refresher import MIN_SLEEP
from amo_gateway.tokens import CONNECTED, REAUTH_REQUIRED, Account, account_due_at
from amo_gateway.typedefs import MANAGER, REFRESHER
from tests.conftest import ACCOUNT_ID, FakeClock, Rig, RigFactory

ACCOUNT = str(ACCOUNT_ID)
LIFETIME = 3600


async def _rig(make_rig: RigFactory, **extra: object) -> tuple[Rig, FakeClock]:
    clock = FakeClock()
    rig = await make_rig(clock=clock, run_refresher=False, refresh_margin=600, sandbox_access_ttl=LIFETIME, **extra)
    await rig.connect()
    return rig, clock


def _stored(rig: Rig) -> Account:
    data, _ = rig.vault().read()
    return data.accounts[ACCOUNT]


async def test_nothing_is_refreshed_before_the_margin(make_rig: RigFactory) -> None:
    """A fresh pair is left alone until margin seconds before expiry."""
    rig, clock = await _rig(make_rig)
    clock.advance(LIFETIME - 600 - 400)  # even the largest per-account spread (10% of margin) is not reached
    outcomes = await rig.app[REFRESHER].tick()
    assert outcomes == []
    assert rig.sandbox.refresh_attempts == 0


async def test_due_pair_is_refreshed_and_persisted_before_use(make_rig: RigFactory) -> None:
    """Past the due time one refresh happens; the vault holds the new pair the sandbox accepts."""
    rig, clock = await _rig(make_rig)
    old = _stored(rig).tokens
    clock.advance(LIFETIME - 590)
    outcomes = await rig.app[REFRESHER].tick()
    assert [o.result for o in outcomes] == ["refreshed"]
    new = _stored(rig).tokens
    assert new is not None and old is not None
    assert new.refresh_token != old.refresh_token
    assert new.refresh_token == rig.sandbox.live_refresh_token(ACCOUNT_ID)
    resp = await rig.client.get(rig.url("/token"), headers=rig.admin)
    assert (await resp.json())["access_token"] == new.access_token


async def test_background_task_refreshes_with_no_traffic(make_rig: RigFactory) -> None:
    """The refresher (a cleanup_ctx task) wakes on its own when the clock passes the due time."""
    clock = FakeClock()
    rig = await make_rig(clock=clock, refresh_margin=600, sandbox_access_ttl=LIFETIME)
    await rig.connect()
    await asyncio.sleep(0.2)
    clock.advance(LIFETIME - 590)
    for _ in range(100):
        if rig.sandbox.refresh_attempts:
            break
        await asyncio.sleep(0.05)
        clock.advance(0)  # wake sleepers so they re-check
    assert rig.sandbox.refresh_attempts == 1


async def test_a_pair_falling_due_during_a_round_is_refreshed_at_once_not_after_recheck(
        make_rig: RigFactory) -> None:
    """The sleep ends a hair before the due time (the loop's clock is not the wall clock, uvloop's ticks are 1 ms):
    the round's tick finds nothing due, the plan a moment later finds the pair due. The next round must come at
    once; it used to be planned only from the pairs still ahead, so the refresher slept `recheck` (60 s) past the
    due time (caught by the SIGKILL alert test on a loaded CI machine)."""
    rig, clock = await _rig(make_rig)
    refresher = rig.app[REFRESHER]
    due_at = account_due_at(_stored(rig), refresher.margin)
    assert due_at is not None
    clock.now = due_at - 0.0005
    tick = refresher.tick

    async def tick_then_cross_the_due_time() -> list[object]:
        outcomes = await tick()
        clock.advance(0.001)
        return outcomes  # type: ignore[return-value]

    refresher.tick = tick_then_cross_the_due_time  # type: ignore[method-assign]
    assert await refresher._round() == MIN_SLEEP
    assert rig.sandbox.refresh_attempts == 0
    refresher.tick = tick  # type: ignore[method-assign]
    assert await refresher._round() > MIN_SLEEP  # the next round refreshed it; the new pair is far off
    assert rig.sandbox.refresh_attempts == 1


async def test_transient_failure_keeps_the_old_pair_and_backs_off(make_rig: RigFactory) -> None:
    """A 503 leaves the pair untouched, the next try waits (backoff), and then succeeds."""
    rig, clock = await _rig(make_rig)
    old = _stored(rig).tokens
    rig.sandbox.fail_next["token"] = [503]
    clock.advance(LIFETIME - 590)
    first = await rig.app[REFRESHER].tick()
    assert [o.result for o in first] == ["transient"]
    assert _stored(rig).tokens == old
    assert _stored(rig).status == CONNECTED
    assert await rig.app[REFRESHER].tick() == [], "an immediate retry would be a retry storm"
    clock.advance(400)
    again = await rig.app[REFRESHER].tick()
    assert [o.result for o in again] == ["refreshed"]


async def test_revoked_token_moves_to_reauth_without_retry_storm(make_rig: RigFactory) -> None:
    """'Token has been revoked' → reauth_required, visible in /test and /token, and no further attempts."""
    rig, clock = await _rig(make_rig)
    rig.sandbox.revoke(ACCOUNT_ID, access=False)
    clock.advance(LIFETIME - 590)
    outcomes = await rig.app[REFRESHER].tick()
    assert [o.result for o in outcomes] == ["reauth"]
    stored = _stored(rig)
    assert stored.status == REAUTH_REQUIRED
    assert stored.reason is not None and stored.reason.startswith("token_revoked")
    attempts = rig.sandbox.refresh_attempts
    for _ in range(3):
        clock.advance(3600)
        assert await rig.app[REFRESHER].tick() == []
    assert rig.sandbox.refresh_attempts == attempts
    for path, headers in (("/test", {}), ("/token", rig.admin)):
        resp = await rig.client.get(rig.url(path), headers=headers)
        assert (resp.status, (await resp.json())["error"]) == (503, "reauth_required")


async def test_lost_refresh_answer_is_detected_on_the_next_attempt(make_rig: RigFactory) -> None:
    """The sandbox spends the token but the answer is lost: the in-flight marker stays in the vault,
    and the next attempt names the cause instead of looking like a random revocation."""
    rig, clock = await _rig(make_rig)
    rig.sandbox.drop_next_refresh = 1
    clock.advance(LIFETIME - 590)
    assert [o.result for o in await rig.app[REFRESHER].tick()] == ["transient"]
    marked = _stored(rig)
    assert marked.in_flight is not None and marked.status == CONNECTED
    clock.advance(600)
    assert [o.result for o in await rig.app[REFRESHER].tick()] == ["reauth"]
    stored = _stored(rig)
    assert stored.status == REAUTH_REQUIRED
    assert stored.reason is not None and stored.reason.startswith("refresh_answer_lost")


async def test_concurrent_refreshes_of_one_token_reach_amocrm_once(make_rig: RigFactory) -> None:
    """Twenty coroutines that all saw the same dead access token cause exactly one refresh."""
    rig, _ = await _rig(make_rig)
    seen = _stored(rig).tokens
    assert seen is not None
    manager = rig.app[MANAGER]
    results = await asyncio.gather(*(manager.refresh(ACCOUNT, seen=seen.access_token) for _ in range(20)))
    assert sorted(r.result for r in results).count("refreshed") == 1
    assert rig.sandbox.refresh_attempts == 1
    assert rig.sandbox.refresh_tokens_reused == 0


async def test_expired_access_token_is_refreshed_before_it_is_handed_out(make_rig: RigFactory) -> None:
    """/token never hands out an expired token: it refreshes first (single-flight)."""
    rig, clock = await _rig(make_rig)
    old = _stored(rig).tokens
    assert old is not None
    clock.advance(LIFETIME + 10)
    answers = await asyncio.gather(*(rig.client.get(rig.url("/token"), headers=rig.admin) for _ in range(5)))
    bodies = [await a.json() for a in answers]
    assert {b["access_token"] for b in bodies} == {_stored(rig).tokens.access_token}  # type: ignore[union-attr]
    assert old.access_token not in {b["access_token"] for b in bodies}
    assert rig.sandbox.refresh_attempts == 1


async def test_restart_in_every_state_keeps_what_was_stored(make_rig: RigFactory) -> None:
    """A new gateway on the same vault sees connected, reauth and in-flight accounts as they were."""
    rig, clock = await _rig(make_rig)
    rig.sandbox.drop_next_refresh = 1
    clock.advance(LIFETIME - 590)
    await rig.app[REFRESHER].tick()
    in_flight = _stored(rig)
    again = await make_rig(vault_path=rig.settings.vault_path, run_refresher=False)
    resp = await again.client.get(again.url("/token"), headers=again.admin)
    assert resp.status == 200
    assert (await resp.json())["access_token"] == in_flight.tokens.access_token  # type: ignore[union-attr]
    await rig.app[MANAGER].store.update(
        lambda data: data.accounts.__setitem__(ACCOUNT, data.accounts[ACCOUNT].needing_reauth("test")))
    third = await make_rig(vault_path=rig.settings.vault_path, run_refresher=False)
    resp = await third.client.get(third.url("/token"), headers=third.admin)
    assert (resp.status, (await resp.json())["error"]) == (503, "reauth_required")


async def test_refresher_survives_a_failing_round_and_carries_on(make_rig: RigFactory) -> None:
    """An exception in one round (say, an unreadable vault) is logged; the task stays alive for the next."""
    clock = FakeClock()
    rig = await make_rig(clock=clock, refresh_margin=600, sandbox_access_ttl=LIFETIME)
    await rig.connect()
    refresher = rig.app[REFRESHER]
    calls = 0
    original = refresher.tick

    async def flaky_tick() -> list[object]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk went away")
        return await original()  # type: ignore[return-value]

    refresher.tick = flaky_tick  # type: ignore[method-assign]
    refresher.wake()
    await asyncio.sleep(0.1)
    clock.advance(LIFETIME)  # past the error pause and the due time
    for _ in range(100):
        if rig.sandbox.refresh_attempts:
            break
        await asyncio.sleep(0.05)
        clock.advance(1)
    assert calls >= 2
    assert rig.sandbox.refresh_attempts == 1
