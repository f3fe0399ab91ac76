"""The PostgreSQL backend's own decisions (amo_gateway/backends/), pinned exactly: tests the mutation gate asked for.

The contract tests (test_store_contract.py) hold both backends to the same StateStore behaviour; these pin
what only the database backend has: the operator tools (migrate-state's export and import, rotate-key's
reseal) run in this process rather than through the CLI, the shared amoCRM budget, and the shared
Idempotency-Key answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest
from cryptography.fernet import Fernet

from amo_gateway.backends.pg_rate import SharedWindowLimiter
from amo_gateway.backends.pg_schema import key_fp
from amo_gateway.backends.postgres import PgStore
from amo_gateway.errors import BadRequest, IdempotencyConflict, StateUnavailable
from amo_gateway.tokens import Account, PendingState, TokenPair, VaultData
from amo_gateway.vault import KeyRing

NOW = 1_800_000_000.0
Opener = Callable[..., Awaitable[PgStore]]


def _account(account_id: str) -> Account:
    pair = TokenPair(f"a-{account_id}", f"r-{account_id}", expires_at=NOW + 3600, obtained_at=NOW)
    return Account(account_id, "https://demo.amocrm.ru").with_pair(pair)


def _pending(label: str) -> PendingState:
    return PendingState("authorize", NOW, NOW + 600, label=label)


@pytest.fixture
async def opened(database_url: str, keys: KeyRing) -> AsyncIterator[Opener]:
    """Opens PgStores on the test's database (the test's key ring unless told otherwise); closes them after."""
    stores: list[PgStore] = []

    async def open_store(ring: KeyRing | None = None) -> PgStore:
        store = PgStore(database_url, ring or keys, lease_seconds=5)
        await store.open()
        stores.append(store)
        return store

    yield open_store
    for store in stores:
        await store.close()


def _key_fps(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT key_fp FROM amo_accounts UNION ALL SELECT key_fp FROM amo_states").fetchall()
    return {r[0] for r in rows}


# --- migrate-state and rotate-key, in process ---

async def test_import_adds_every_record_keeps_the_rest_and_export_returns_them_all(opened: Opener) -> None:
    store = await opened()
    await store.put_account(_account("9"))
    await store.add_state("kept", _pending("kept"), NOW)
    incoming = VaultData(accounts={"7": _account("7"), "8": _account("8")}, states={"s": _pending("s")},
                         exchange_slots={"login": NOW + 300})
    await store.import_all(incoming)
    exported = await (await opened()).export_all()
    assert exported.accounts == {"7": _account("7"), "8": _account("8"), "9": _account("9")}
    assert exported.states == {"s": _pending("s"), "kept": _pending("kept")}
    assert exported.exchange_slots == {"login": NOW + 300}
    assert set((await store.reload()).accounts) == {"7", "8", "9"}


async def test_reseal_moves_every_row_to_the_primary_key_in_batches_and_counts_them(
        opened: Opener, database_url: str) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    before = await opened(KeyRing([old]))
    for n in range(3):
        await before.put_account(_account(str(n)))
    await before.add_state("s1", _pending("1"), NOW)
    await before.add_state("s2", _pending("2"), NOW)
    assert _key_fps(database_url) == {key_fp(old)}
    rotated = await opened(KeyRing([new, old]))
    assert await rotated.reseal(batch=2) == 5  # 2 + 1 accounts, then 2 states
    assert _key_fps(database_url) == {key_fp(new)}
    assert await rotated.reseal(batch=2) == 0
    after = await (await opened(KeyRing([new]))).export_all()  # the old key is no longer needed for any row
    assert set(after.accounts) == {"0", "1", "2"} and set(after.states) == {"s1", "s2"}


# --- the shared amoCRM budget ---

async def test_a_shared_window_admits_its_limit_then_names_the_wait_until_the_oldest_send_leaves(
        opened: Opener) -> None:
    store = await opened()
    limiter = SharedWindowLimiter(store.pool, "7", 2, 10, window=1.0)
    started = time.monotonic()
    assert [await limiter._try_send(), await limiter._try_send()] == [0.0, 0.0]
    wait = await limiter._try_send()
    assert 1.0 - (time.monotonic() - started) - 0.05 <= wait <= 1.0
    assert await SharedWindowLimiter(store.pool, "8", 2, 10, window=1.0)._try_send() == 0.0  # per account
    await asyncio.sleep(wait + 0.01)
    assert await limiter._try_send() == 0.0
    with psycopg.connect(store._url) as conn:  # sends older than the window were deleted, not kept forever
        rows = conn.execute("SELECT count(*) FROM amo_rate_sends WHERE account_id = '7'").fetchone()
    assert rows is not None and rows[0] <= 2  # of the three sends at least the first one is gone


async def test_replicas_racing_for_one_account_are_admitted_at_most_the_limit(opened: Opener) -> None:
    stores = [await opened() for _ in range(3)]
    racers = [SharedWindowLimiter(s.pool, "7", 3, 10, window=30.0) for s in stores for _ in range(3)]
    waits = await asyncio.gather(*(r._try_send() for r in racers))
    assert sorted(w == 0.0 for w in waits) == [False] * 6 + [True] * 3
    assert all(28 < w <= 30 for w in waits if w)


async def test_shared_limiters_are_one_per_account_with_the_given_settings(opened: Opener) -> None:
    limiters = (await opened()).limiters(3, 5, window=2.0)
    one = limiters.get("7")
    assert isinstance(one, SharedWindowLimiter) and limiters.get("7") is one and limiters.get("8") is not one
    assert (one.limit, one.queue, one.window) == (3, 5, 2.0)


async def test_a_shared_window_without_its_database_says_the_limit_is_unreachable(opened: Opener) -> None:
    store = await opened()
    limiter = SharedWindowLimiter(store.pool, "7", 2, 10, window=1.0)
    await store.pool.close()
    with pytest.raises(StateUnavailable, match=r"^the shared rate limit is unreachable: "):
        await limiter._try_send()


# --- the shared Idempotency-Key answers ---

async def test_an_answer_is_replayed_by_another_replica_with_its_status_headers_and_body(opened: Opener) -> None:
    one, two = (await opened()).answers(60, 0), (await opened()).answers(60, 0)
    assert one.size == 0
    assert await one.begin("c", "k", "fp") is None
    with pytest.raises(IdempotencyConflict, match="still in flight"):
        await two.begin("c", "k", "fp")
    await one.finish("c", "k", 201, (("Content-Type", "application/json"),), b'{"id": 1}')
    found = await two.begin("c", "k", "fp")
    assert found is not None
    assert (found.status, found.headers, found.body) == (201, (("Content-Type", "application/json"),), b'{"id": 1}')
    with pytest.raises(IdempotencyConflict, match="different request"):
        await two.begin("c", "k", "other-fp")
    assert await two.begin("other consumer", "k", "fp") is None  # keys are per consumer


async def test_an_answer_without_a_body_is_not_replayed(opened: Opener) -> None:
    answers = (await opened()).answers(60, 0)
    await answers.begin("c", "k", "fp")
    await answers.finish("c", "k", 200, (), None)
    with pytest.raises(IdempotencyConflict, match="too large"):
        await answers.begin("c", "k", "fp")


async def test_a_first_request_without_an_answer_blocks_its_key_until_forgotten(opened: Opener) -> None:
    answers = (await opened()).answers(60, 0)
    await answers.begin("c", "k", "fp")
    await answers.begin("c", "other", "fp")
    await answers.unknown("c", "k")
    with pytest.raises(IdempotencyConflict, match="got no answer from amoCRM"):
        await answers.begin("c", "k", "fp")
    with pytest.raises(IdempotencyConflict, match="still in flight"):  # unknown() touched only its own key
        await answers.begin("c", "other", "fp")
    await answers.forget("c", "k")
    assert await answers.begin("c", "k", "fp") is None  # forgotten: the key can be used again
    with pytest.raises(IdempotencyConflict, match="still in flight"):  # forget() dropped only its own key
        await answers.begin("c", "other", "fp")


async def test_a_key_is_free_again_once_its_window_has_passed(opened: Opener) -> None:
    answers = (await opened()).answers(0.3, 0)
    assert await answers.begin("c", "k", "fp") is None
    with pytest.raises(IdempotencyConflict):
        await answers.begin("c", "k", "fp")
    await asyncio.sleep(0.4)
    assert await answers.begin("c", "k", "fp") is None


async def test_an_answer_sealed_by_a_retired_key_is_not_replayed(opened: Opener) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    answers = (await opened(KeyRing([old]))).answers(60, 0)
    await answers.begin("c", "k", "fp")
    await answers.finish("c", "k", 200, (), b"x")
    with pytest.raises(IdempotencyConflict, match="evicted"):
        await (await opened(KeyRing([new]))).answers(60, 0).begin("c", "k", "fp")


@pytest.mark.parametrize(("key", "allowed"), [("", False), ("k" * 255, True), ("k" * 256, False)])
async def test_an_idempotency_key_is_1_to_255_characters(opened: Opener, key: str, allowed: bool) -> None:
    answers = (await opened()).answers(60, 0)
    if allowed:
        assert await answers.begin("c", key, "fp") is None
        return
    with pytest.raises(BadRequest) as refused:
        await answers.begin("c", key, "fp")
    assert refused.value.code == "bad_idempotency_key"
    assert refused.value.detail == "Idempotency-Key must be 1 to 255 characters"


async def test_shared_answers_without_their_database_say_so(opened: Opener) -> None:
    store = await opened()
    answers = store.answers(60, 0)
    await store.pool.close()
    with pytest.raises(StateUnavailable, match=r"^the shared Idempotency-Key answers are unreachable: "):
        await answers.forget("c", "k")
