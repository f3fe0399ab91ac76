"""One outbox contract, both backends: the file beside the vault and PostgreSQL must keep alerts alike.

Each test runs twice (`file`, `postgres`), with two outbox instances on the same outbox wherever sharing is the
point (two processes on one vault, or two replicas on one database): an alert is raised once, a delivery is
leased to one of them, a holder that dies leaves it to the other with the same id, a target's order holds, and
the bounds (AMO_ALERT_OUTBOX_MAX, the history cap) drop the oldest and count them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from amo_gateway.backends.base import Active, OutboxStore
from amo_gateway.backends.pg_outbox import PgOutbox
from amo_gateway.backends.pg_schema import migrate, open_pool
from amo_gateway.outbox import HISTORY_MAX, Outbox, outbox_path

NOW = 1_800_000_000.0
MakeOutbox = Callable[[], Awaitable[OutboxStore]]


@pytest.fixture(params=["file", "postgres"])
async def make_outbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeOutbox]:
    """Outboxes on one shared outbox: the same file, or the same database (each with a pool of its own)."""
    pools: list[Any] = []
    url = str(request.getfixturevalue("database_url")) if request.param == "postgres" else ""

    async def make() -> OutboxStore:
        if not url:
            return Outbox(outbox_path(tmp_path / "vault.enc"))
        pool = await open_pool(url, max_size=4)
        pools.append(pool)
        await migrate(pool)
        return PgOutbox(pool)

    yield make
    for pool in pools:
        await pool.close()


def _alert(n: int, account: str = "1") -> dict[str, Any]:
    return {"id": f"alert-{n:04d}", "event": "reauth_required", "account_id": account, "subdomain": "demo"}


def _raise_once(key: str, alert: dict[str, Any]) -> Callable[[Active], list[dict[str, Any]]]:
    """A decision like alerts.reconcile's: alert when the condition is not yet recorded as active."""
    def decide(active: Active) -> list[dict[str, Any]]:
        if key in active:
            return []
        active[key] = {"kind": "reauth_required", "episode": "1", "last_sent": NOW}
        return [alert]
    return decide


async def _queue(box: OutboxStore, count: int, targets: tuple[str, ...] = ("webhook",), max_pending: int = 1000,
                 account: str = "1", start: int = 0) -> None:
    for n in range(start, start + count):
        await box.record(lambda active, n=n: [_alert(n, account)], targets, NOW + n, max_pending)  # type: ignore[misc]


async def test_two_outboxes_raise_a_condition_once(make_outbox: MakeOutbox) -> None:
    """The active record is shared: whichever checks second finds the alert already raised."""
    one, two = await make_outbox(), await make_outbox()
    raised = [*await one.record(_raise_once("1|reauth_required", _alert(1)), ["webhook"], NOW, 10),
              *await two.record(_raise_once("1|reauth_required", _alert(2)), ["webhook"], NOW, 10),
              *await one.record(_raise_once("1|reauth_required", _alert(3)), ["webhook"], NOW, 10)]
    assert [a["id"] for a in raised] == ["alert-0001"]
    assert await two.counts() == (1, 0)
    history = await two.history(None, 10)
    assert [(h["id"], h["targets"]) for h in history] == [("alert-0001", {"webhook": "pending"})]


async def test_a_delivery_is_leased_to_one_and_after_a_crash_resent_with_its_id(make_outbox: MakeOutbox) -> None:
    """Two claimers at once: one gets it. The holder dies (no answer): after its lease the other gets the same id."""
    one, two = await make_outbox(), await make_outbox()
    await _queue(one, 1)
    claims = await asyncio.gather(one.claim("webhook", NOW, NOW + 15, "one", 20),
                                  two.claim("webhook", NOW, NOW + 15, "two", 20))
    assert sorted(len(c) for c in claims) == [0, 1]
    assert await two.claim("webhook", NOW + 14, NOW + 30, "two", 20) == []  # still leased
    again = await two.claim("webhook", NOW + 16, NOW + 31, "two", 20)  # the lease ran out: "one" died
    assert [e["id"] for e in again] == ["alert-0000"] and again[0]["payload"] == _alert(0)
    await two.delivered("alert-0000", "webhook", NOW + 17)
    assert await one.claim("webhook", NOW + 100, NOW + 115, "one", 20) == []
    assert await one.counts() == (0, 0)
    [entry] = await one.history(None, 5)
    assert entry["targets"] == {"webhook": "delivered"} and entry["delivered_at"] == {"webhook": NOW + 17}


async def test_many_concurrent_claims_deliver_each_alert_once(make_outbox: MakeOutbox) -> None:
    """30 alerts, two outboxes each running three delivery loops: every alert is taken exactly once."""
    boxes = [await make_outbox(), await make_outbox()]
    await _queue(boxes[0], 30)
    taken: list[str] = []

    async def loop(box: OutboxStore, owner: str) -> None:
        deadline = asyncio.get_running_loop().time() + 20  # until all are taken: a fixed count of tries is a race
        while len(taken) < 30 and asyncio.get_running_loop().time() < deadline:
            batch = await box.claim("webhook", NOW + 100, NOW + 115, owner, 4)
            for entry in batch:
                taken.append(entry["id"])
                await box.delivered(entry["id"], "webhook", NOW + 100)
            await asyncio.sleep(0.001)

    await asyncio.gather(*(loop(box, f"{n}-{i}") for n, box in enumerate(boxes) for i in range(3)))
    assert sorted(taken) == [f"alert-{n:04d}" for n in range(30)]
    assert await boxes[1].counts() == (0, 0)


async def test_a_failed_head_holds_its_targets_later_alerts_back(make_outbox: MakeOutbox) -> None:
    """Order per target: while the first waits out its backoff nothing behind it goes; another target is free."""
    box = await make_outbox()
    await _queue(box, 3, targets=("webhook", "telegram"))
    batch = await box.claim("webhook", NOW + 5, NOW + 20, "me", 20)
    assert [e["id"] for e in batch] == ["alert-0000", "alert-0001", "alert-0002"]
    await box.failed("alert-0000", "webhook", NOW + 60, "http_500")
    await box.release("webhook", ["alert-0001", "alert-0002"], "me")
    assert await box.claim("webhook", NOW + 30, NOW + 45, "me", 20) == []
    assert [e["id"] for e in await box.claim("telegram", NOW + 30, NOW + 45, "me", 1)] == ["alert-0000"]
    retried = await box.claim("webhook", NOW + 61, NOW + 76, "me", 2)
    assert [(e["id"], e["attempts"], e["last_error"]) for e in retried] == [("alert-0000", 1, "http_500"),
                                                                            ("alert-0001", 0, None)]


async def test_the_bounds_drop_the_oldest_and_count_them(make_outbox: MakeOutbox) -> None:
    """Past max_pending the oldest delivery goes (counted, history says dropped); history keeps HISTORY_MAX."""
    one, two = await make_outbox(), await make_outbox()
    await _queue(one, HISTORY_MAX + 5, max_pending=3)
    assert await two.counts() == (3, HISTORY_MAX + 2)
    batch = await two.claim("webhook", NOW + 10**4, NOW + 10**4 + 15, "two", 20)
    assert [e["id"] for e in batch] == [f"alert-{n:04d}" for n in range(HISTORY_MAX + 2, HISTORY_MAX + 5)]
    history = await two.history(None, HISTORY_MAX + 10)
    assert len(history) == HISTORY_MAX and history[0]["id"] == f"alert-{HISTORY_MAX + 4:04d}"
    assert history[3]["targets"] == {"webhook": "dropped"}


async def test_a_target_no_longer_configured_is_forgotten(make_outbox: MakeOutbox) -> None:
    """Deliveries to a removed target are dropped (not counted as lost); the history says so."""
    box = await make_outbox()
    await _queue(box, 2, targets=("webhook", "telegram"))
    await box.record(lambda active: [], ["telegram"], NOW + 10, 10)
    assert await box.claim("webhook", NOW + 10, NOW + 25, "me", 20) == []
    assert await box.counts() == (2, 0)
    assert all(h["targets"] == {"webhook": "dropped", "telegram": "pending"} for h in await box.history(None, 5))


async def test_history_is_newest_first_per_account_and_limited(make_outbox: MakeOutbox) -> None:
    one, two = await make_outbox(), await make_outbox()
    await _queue(one, 3, account="1")
    await _queue(one, 2, account="2", start=3)
    assert [h["id"] for h in await two.history("1", 2)] == ["alert-0002", "alert-0001"]
    assert {h["account_id"] for h in await two.history(None, 10)} == {"1", "2"}
