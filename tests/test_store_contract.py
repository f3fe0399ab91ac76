"""One contract, every backend: the vault file and PostgreSQL must answer each StateStore operation alike.

Each test runs twice (`file`, `postgres`), with two store instances on the same state wherever sharing is the
point: what one writes the other must see, a claim's marker must be durable before amoCRM is called, a state
is used up once, a slot holds, a lock excludes, and a change by one wakes the other.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from amo_gateway.backends.base import StateStore
from amo_gateway.backends.postgres import PgStore
from amo_gateway.errors import ExchangeTooSoon, UpstreamRejected
from amo_gateway.manager import Outcome
from amo_gateway.store import Store
from amo_gateway.tokens import Account, PendingState, TokenPair, fingerprint
from amo_gateway.vault import KeyRing, Vault

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000.0
MakeStore = Callable[[], Awaitable[StateStore]]


def _account(account_id: str = "1", refresh: str = "r-0", expires_at: float = NOW + 30) -> Account:
    pair = TokenPair(access_token=f"a-{refresh}", refresh_token=refresh, expires_at=expires_at, obtained_at=NOW - 60)
    return Account(account_id=account_id, base_url="https://demo.amocrm.ru").with_pair(pair)


def _pending(expires_at: float = NOW + 600) -> PendingState:
    return PendingState("authorize", NOW, expires_at, label="l")


@pytest.fixture(params=["file", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """`file:<path>` or the URL of a fresh database."""
    if request.param == "file":
        return f"file:{tmp_path / 'vault' / 'vault.enc'}"
    return str(request.getfixturevalue("database_url"))


def open_backend(where: str, keys: KeyRing) -> StateStore:
    if where.startswith("file:"):
        return Store(Vault(Path(where[len("file:"):]), keys))
    return PgStore(where, keys, lease_seconds=5)


@pytest.fixture
async def make_store(backend: str, keys: KeyRing) -> AsyncIterator[MakeStore]:
    opened: list[StateStore] = []

    async def make() -> StateStore:
        store = open_backend(backend, keys)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def test_an_account_put_by_one_is_read_by_another_and_forgotten_once(make_store: MakeStore) -> None:
    one, two = await make_store(), await make_store()
    await one.put_account(_account("1"))
    assert (await two.reload()).accounts["1"].tokens == _account("1").tokens
    assert await two.forget("1") is True
    assert await one.forget("1") is False
    assert "1" not in (await one.reload()).accounts


async def test_a_claim_marks_in_flight_durably_before_amocrm_is_called(make_store: MakeStore) -> None:
    """The marker is in the shared state as soon as `claim` returns: a crash after sending leaves evidence."""
    one, two = await make_store(), await make_store()
    await one.put_account(_account("1"))
    claims = await one.claim(["1"], NOW, 60, None, skip_locked=True)
    assert [(c[0].account_id, c[1]) for c in claims] == [("1", None)]
    marker = (await two.reload()).accounts["1"].in_flight
    assert marker is not None and marker.refresh_fp == fingerprint("r-0")


async def test_a_marker_left_behind_is_handed_to_the_next_claim_as_lost_answer_evidence(make_store: MakeStore) -> None:
    one, two = await make_store(), await make_store()
    await one.put_account(_account("1"))
    await one.claim(["1"], NOW, 60, None, skip_locked=False)  # ...and the process died before storing
    claims = await two.claim(["1"], NOW + 1, 60, None, skip_locked=False)
    assert len(claims) == 1 and claims[0][1] is not None and claims[0][1].refresh_fp == fingerprint("r-0")
    rejected = Outcome("1", "reauth", reason="refresh_answer_lost: test",
                       error=UpstreamRejected("no", hint="Token has been revoked"))
    stored = await two.store_outcomes([rejected], NOW + 2)
    assert stored["1"].status == "reauth_required" and stored["1"].in_flight is None
    assert (await one.reload()).accounts["1"].reason == "refresh_answer_lost: test"


async def test_nothing_is_claimed_when_the_pair_was_replaced_or_is_not_due(make_store: MakeStore) -> None:
    one = await make_store()
    await one.put_account(_account("1", expires_at=NOW + 7200))
    assert await one.claim(["1"], NOW, 60, None, skip_locked=True) == []  # not due
    assert await one.claim(["1"], NOW, 60, "a-older", skip_locked=False) == []  # someone already replaced it
    assert await one.claim(["absent"], NOW, 60, None, skip_locked=True) == []
    assert (await one.reload()).accounts["1"].in_flight is None


async def test_an_outcome_is_stored_for_every_instance_and_a_forgotten_account_stays_forgotten(
        make_store: MakeStore) -> None:
    one, two = await make_store(), await make_store()
    await one.put_account(_account("1"))
    await one.put_account(_account("2"))
    await one.claim(["1", "2"], NOW, 60, None, skip_locked=True)
    await two.forget("2")  # disconnected while its refresh was in flight
    fresh = TokenPair("a-new", "r-1", NOW + 86400, NOW)
    stored = await one.store_outcomes([Outcome("1", "refreshed", pair=fresh), Outcome("2", "refreshed", pair=fresh)],
                                      NOW)
    assert set(stored) == {"1"}
    seen = await two.reload()
    assert seen.accounts["1"].tokens == fresh and seen.accounts["1"].in_flight is None
    assert "2" not in seen.accounts


async def test_a_state_is_used_up_exactly_once_across_instances(make_store: MakeStore) -> None:
    one, two = await make_store(), await make_store()
    await one.add_state("k", _pending(), NOW)
    assert await two.peek_state("k") == _pending()
    popped = await asyncio.gather(one.pop_state("k"), two.pop_state("k"), one.pop_state("k"))
    assert sorted(p is not None for p in popped) == [False, False, True]
    assert await two.peek_state("k") is None


async def test_adding_a_state_drops_expired_ones(make_store: MakeStore) -> None:
    one = await make_store()
    await one.add_state("old", _pending(expires_at=NOW + 1), NOW)
    await one.add_state("new", _pending(), NOW + 10)
    assert await one.peek_state("old") is None and await one.peek_state("new") is not None


async def test_an_exchange_slot_holds_across_instances_until_released_or_spent(make_store: MakeStore) -> None:
    one, two = await make_store(), await make_store()
    await one.reserve_exchange("login", NOW, NOW + 300, "s1", _pending())
    with pytest.raises(ExchangeTooSoon) as refused:
        await two.reserve_exchange("login", NOW + 10, NOW + 310, "s2", _pending())
    assert refused.value.retry_after == 291
    assert await two.peek_state("s2") is None  # a refused reservation records nothing
    await two.release_exchange("login", "s1")
    assert await one.peek_state("s1") is None
    await two.reserve_exchange("login", NOW + 20, NOW + 320, "s3", _pending())
    await one.reserve_exchange("login", NOW + 321, NOW + 621, "s4", _pending())  # spent: free again


async def test_concurrent_reservations_of_one_slot_let_exactly_one_through(make_store: MakeStore) -> None:
    stores = [await make_store() for _ in range(3)]
    results = await asyncio.gather(*(s.reserve_exchange("login", NOW, NOW + 300, f"s{i}", _pending())
                                     for i, s in enumerate(stores)), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["ExchangeTooSoon", "ExchangeTooSoon", "NoneType"]


async def test_the_refresh_lock_excludes_other_coroutines_until_released(make_store: MakeStore) -> None:
    """Across processes the turn-taking test below proves it (fcntl record locks belong to a process)."""
    locks = (await make_store()).refresh_locks()
    try:
        assert await locks.try_hold("1") is True
        assert await locks.try_hold("1") is False
        assert await locks.try_hold("2") is True
        waiter = asyncio.ensure_future(_hold_briefly(locks, "1"))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        await locks.release("1")
        await asyncio.wait_for(waiter, 5)
        assert await locks.try_hold("1") is True
        await locks.release("1")
        await locks.release("2")
    finally:
        locks.close()


async def _hold_briefly(locks: Any, account_id: str) -> None:
    async with locks.hold(account_id):
        await asyncio.sleep(0.01)


async def test_a_change_by_one_wakes_the_others_waiter(make_store: MakeStore) -> None:
    one, two = await make_store(), await make_store()
    await asyncio.sleep(0.2)  # the PostgreSQL listener connects
    waiter = asyncio.ensure_future(two.wait_for_change(0.05))
    await asyncio.sleep(0.3)
    await one.put_account(_account("9"))
    await asyncio.wait_for(waiter, 5)
    assert "9" in (await two.reload()).accounts


async def test_a_change_made_before_the_wait_still_wakes_it(make_store: MakeStore) -> None:
    """A change that lands while the waiter is busy (after it planned, before it waits) must not be slept through."""
    one, two = await make_store(), await make_store()
    await asyncio.sleep(0.2)  # the PostgreSQL listener connects
    await two.snapshot(recheck=True)  # what two plans from
    await one.put_account(_account("9"))
    await asyncio.sleep(0.3)  # the NOTIFY (or the new file) arrives before two waits
    await asyncio.wait_for(two.wait_for_change(0.05), 5)
    assert "9" in (await two.reload()).accounts


async def test_batch_claims_never_hand_one_account_to_two_claimers(make_store: MakeStore) -> None:
    """Many concurrent claimers over the same accounts: each account is claimed once, not twice."""
    stores = [await make_store() for _ in range(4)]
    ids = [str(i) for i in range(20)]
    for account_id in ids:
        await stores[0].put_account(_account(account_id))
    rounds = await asyncio.gather(*(s.claim(ids, NOW, 60, None, skip_locked=True) for s in stores for _ in range(2)))
    fresh = [c[0].account_id for claims in rounds for c in claims if c[1] is None]
    assert sorted(fresh) == sorted(ids)  # a second claim of an account would carry the first one's marker


CLAIMER = textwrap.dedent('''
    import asyncio, sys
    from dataclasses import replace
    sys.path.insert(0, {root!r})
    from amo_gateway.manager import Outcome
    from amo_gateway.tokens import TokenPair
    from amo_gateway.vault import KeyRing
    from tests.test_store_contract import open_backend

    async def main() -> None:
        store = open_backend({where!r}, KeyRing.parse({key!r}))
        await store.open()
        locks = store.refresh_locks()
        spent = []
        for n in range({rounds}):
            async with locks.hold("1"):
                claims = await store.claim(["1"], 1.9e9, 1e12, None, skip_locked=False)
                token = claims[0][0].tokens.refresh_token
                spent.append(token)
                pair = TokenPair("a", f"{{token}}-{tag}{{n}}", 2e9, 1e9)
                await store.store_outcomes([Outcome("1", "refreshed", pair=pair)], 1.9e9)
        locks.close()
        await store.close()
        print(" ".join(spent))

    asyncio.run(main())
''')


async def test_two_processes_taking_turns_never_spend_one_refresh_token_twice(
        make_store: MakeStore, backend: str, keys: KeyRing) -> None:
    """Two processes, each lock-claim-store in a loop: each claim sees the token the other stored last."""
    store = await make_store()
    await store.put_account(_account("1"))
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLAIMER.format(root=str(ROOT), where=backend, key=keys.keys[0], rounds=15, tag=tag),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for tag in "xy"]
    outputs = [await asyncio.wait_for(p.communicate(), 120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    spent = [token for out, _ in outputs for token in out.decode().split()]
    assert len(spent) == 30 and len(set(spent)) == 30


@pytest.mark.parametrize(("ci", "verdict"), [("true", "1 error"), ("", "1 skipped")])
async def test_without_postgresql_ci_fails_loudly_and_a_laptop_skips(tmp_path: Path, ci: str, verdict: str) -> None:
    """The database fixtures, in a pytest of their own where no server can be found."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("def test_needs_postgres(database_url):\n    assert database_url\n")
    env = {**os.environ, "CI": ci, "AMO_TEST_POSTGRES": "absent", "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest", str(probe),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 120))[0].decode()
    assert verdict in out, out[-1500:]
    if ci:
        assert "CI needs a real PostgreSQL" in out


async def test_batch_locks_take_only_what_nobody_holds(make_store: MakeStore) -> None:
    locks = (await make_store()).refresh_locks()
    try:
        assert await locks.try_hold("2") is True
        assert await locks.try_hold_many(["1", "2", "3", "1"]) == ["1", "3"]
        assert await locks.try_hold_many(["1", "3"]) == []
        await locks.release_many(["1", "3"])
        await locks.release("2")
        assert await locks.try_hold_many(["1", "2", "3"]) == ["1", "2", "3"]
        await locks.release_many(["1", "2", "3"])
    finally:
        locks.close()
