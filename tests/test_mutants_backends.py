"""The PostgreSQL backend's own decisions (amo_gateway/backends/), pinned exactly: tests the mutation gate asked for.

The contract tests (test_store_contract.py) hold both backends to the same StateStore behaviour; these pin
what only the database backend has: the operator tools (migrate-state's export and import, rotate-key's
reseal) run in this process rather than through the CLI, the shared amoCRM budget, and the shared
Idempotency-Key answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet

import amo_gateway
from amo_gateway.backends.pg_locks import PgRefreshLocks
from amo_gateway.backends.pg_rate import SharedWindowLimiter
from amo_gateway.backends.pg_schema import Sealer, describe, key_fp, open_pool
from amo_gateway.backends.postgres import RECHECK, PgStore
from amo_gateway.backends.postgres import opened as opened_store
from amo_gateway.errors import (
    BadRequest,
    IdempotencyConflict,
    StateUnavailable,
    UpstreamUnavailable,
    VaultUndecryptable,
)
from amo_gateway.manager import Outcome, TokenManager
from amo_gateway.tokens import Account, PendingState, TokenPair, VaultData
from amo_gateway.vault import KeyRing
from tests.conftest import FakeClock
from tests.test_mutants_manager import DUE, ScriptedAmo, answer
from tests.test_mutants_manager import ID as SCRIPTED_ID
from tests.test_mutants_manager import account as scripted_account

NOW = 1_800_000_000.0
Opener = Callable[..., Awaitable[PgStore]]
CLOSED = "the pool 'amo-gateway' is already closed$"  # the driver's reason, after the backend's own words

MIGRATIONS = Path(amo_gateway.__file__).parent / "migrations"  # the files shipped in the package



def _account(account_id: str) -> Account:
    pair = TokenPair(f"a-{account_id}", f"r-{account_id}", expires_at=NOW + 3600, obtained_at=NOW)
    return Account(account_id, "https://demo.amocrm.ru").with_pair(pair)


def _pending(label: str) -> PendingState:
    return PendingState("authorize", NOW, NOW + 600, label=label)


@pytest.fixture
async def opened(database_url: str, keys: KeyRing) -> AsyncIterator[Opener]:
    """Opens PgStores on the test's database (the test's key ring unless told otherwise); closes them after."""
    stores: list[PgStore] = []

    async def open_store(ring: KeyRing | None = None, key_source: Callable[[], KeyRing] | None = None) -> PgStore:
        store = PgStore(database_url, ring or keys, key_source, lease_seconds=5)
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
    reloads: list[int] = []
    exported = await (await opened(None, lambda: reloads.append(1) or store.keys)).export_all()
    assert reloads == []  # every row under a key the ring holds: no key file read per row
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
    reloads: list[int] = []
    rotated = await opened(KeyRing([new, old]), lambda: reloads.append(1) or KeyRing([new, old]))
    assert await rotated.reseal(batch=2) == 5  # 2 + 1 accounts, then 2 states
    assert _key_fps(database_url) == {key_fp(new)}
    assert await rotated.reseal(batch=2) == 0
    assert reloads == []  # every row was under a key the ring holds: the key file was not read again
    await rotated.pool.close()
    with pytest.raises(StateUnavailable, match=r"^the PostgreSQL state is unreachable: " + CLOSED):
        await rotated.reseal()
    after = await (await opened(KeyRing([new]))).export_all()  # the old key is no longer needed for any row
    assert set(after.accounts) == {"0", "1", "2"} and set(after.states) == {"s1", "s2"}


async def test_a_state_added_again_under_its_key_replaces_the_first(opened: Opener) -> None:
    store = await opened()
    await store.add_state("k", _pending("first"), NOW)
    await store.add_state("k", _pending("second"), NOW + 1)
    assert await (await opened()).peek_state("k") == _pending("second")


async def test_reseal_waits_briefly_for_a_row_in_use_and_keeps_its_transactions_short(
        opened: Opener, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row a replica holds is skipped (SKIP LOCKED), and reseal pauses between passes instead of spinning;
    no pass re-encrypts more than `batch` rows."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    before = await opened(KeyRing([old]))
    for n in range(3):
        await before.put_account(_account(str(n)))
    rotated = await opened(KeyRing([new, old]))
    locker = await psycopg.AsyncConnection.connect(database_url)
    await locker.execute("SELECT 1 FROM amo_accounts WHERE account_id = '1' FOR UPDATE")
    pauses: list[float] = []
    passes: list[int] = []
    original = rotated._reseal_batch

    async def one_pass(table: str, key: str, batch: int) -> int:
        assert len(passes) < 50, "reseal spins without pausing"
        passes.append(await original(table, key, batch))
        return passes[-1]

    async def pause(seconds: float) -> None:
        assert 0 < seconds <= 0.1, seconds
        pauses.append(seconds)
        if len(pauses) == 3:
            await locker.commit()  # the replica is done with its row

    monkeypatch.setattr(rotated, "_reseal_batch", one_pass)
    monkeypatch.setattr("amo_gateway.backends.postgres.asyncio", types.SimpleNamespace(sleep=pause))
    try:
        assert await rotated.reseal(batch=1) == 3
    finally:
        await locker.close()
    assert len(pauses) == 3 and max(passes) == 1
    assert _key_fps(database_url) == {key_fp(new)}


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
    with pytest.raises(StateUnavailable, match=r"^the shared rate limit is unreachable: " + CLOSED):
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


async def test_replaying_an_answer_under_the_current_key_does_not_reload_the_key_file(
        database_url: str, keys: KeyRing) -> None:
    reloads: list[int] = []
    store = PgStore(database_url, keys, lambda: reloads.append(1) or keys)
    await store.open()
    try:
        answers = store.answers(60, 0)
        await answers.begin("c", "k", "fp")
        await answers.finish("c", "k", 200, (), b"x")
        found = await answers.begin("c", "k", "fp")
        assert found is not None and found.body == b"x" and reloads == []
    finally:
        await store.close()


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
    with pytest.raises(StateUnavailable, match=r"^the shared Idempotency-Key answers are unreachable: " + CLOSED):
        await answers.forget("c", "k")


# --- the in-process copy and the listener ---

def _events(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, dict[str, Any]]]:
    return [(r.levelno, r.getMessage(), getattr(r, "fields", {})) for r in caplog.records
            if r.name == "amo_gateway.state"]


class Stop(Exception):
    """Ends a loop that would otherwise run forever."""


class Pauses:
    """Stands in for the module's asyncio: records each pause, stops the loop after `limit` of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.taken.append(seconds)
        if len(self.taken) >= self.limit:
            raise Stop


def test_notes_from_others_mark_their_accounts_stale_and_our_own_are_ignored(keys: KeyRing) -> None:
    store = PgStore("postgresql://nobody@127.0.0.1:1/none", keys)
    store._all_stale, store._checked_at = False, 5.0
    store._heard(json.dumps({"w": store._writer, "a": ["1"]}))
    assert (store._stale, store._all_stale, store._checked_at, store._changed.is_set()) == (set(), False, 5.0, False)
    store._heard(json.dumps({"w": "other", "a": ["1", 2]}))
    assert (store._stale, store._all_stale, store._checked_at, store._changed.is_set()) == (
        {"1", "2"}, False, float("-inf"), True)
    store._heard(json.dumps({"w": "other"}))  # names nothing: nothing more to re-read
    assert (store._stale, store._all_stale) == ({"1", "2"}, False)
    store._heard(json.dumps({"w": "other", "all": True}))
    assert store._all_stale is True
    store._all_stale = False
    store._heard("not json")  # a note nobody can read: re-read everything
    assert store._all_stale is True


async def test_a_change_too_big_for_one_note_tells_the_others_to_reread_everything(opened: Opener) -> None:
    writer, reader = await opened(), await opened()
    many = VaultData(accounts={f"account-{n:05}": _account(f"account-{n:05}") for n in range(600)})
    assert len(json.dumps({"w": writer._writer, "a": list(many.accounts)})) > 8000  # over PostgreSQL's cap
    assert json.loads(writer._payload(list(many.accounts))) == {"w": writer._writer, "all": True}
    assert json.loads(writer._payload(["7"])) == {"w": writer._writer, "a": ["7"]}
    await writer.import_all(many)
    for _ in range(100):
        if len((await reader.snapshot()).accounts) == 600:
            break
        await asyncio.sleep(0.05)
    assert set((await reader.snapshot()).accounts) == set(many.accounts)


async def test_waiting_for_a_change_polls_without_a_listener_and_keeps_a_wake_up_that_came_before_it(
        keys: KeyRing) -> None:
    """Without a listener: a poll. With one: a NOTIFY heard before the wait (while the refresher was busy with a
    round) wakes it at once, and is used up by that wake-up; the next wait sleeps until the next NOTIFY."""
    store = PgStore("postgresql://nobody@127.0.0.1:1/none", keys)
    started = time.monotonic()
    await store.wait_for_change(0.2)
    assert 0.15 <= time.monotonic() - started < 2
    store._listening = True
    store._heard(json.dumps({"w": "other", "a": ["1"]}))  # heard before this wait began
    await asyncio.wait_for(store.wait_for_change(0.01), 1)
    waiter = asyncio.ensure_future(store.wait_for_change(0.01))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    store._heard(json.dumps({"w": "other", "a": ["2"]}))
    await asyncio.wait_for(waiter, 2)


async def test_a_listener_that_cannot_connect_retries_with_growing_pauses_up_to_ten_seconds(
        keys: KeyRing, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="amo_gateway.state")
    store = PgStore(f"postgresql://nobody@127.0.0.1:{_closed_port()}/none?connect_timeout=2", keys)
    pauses = Pauses(7)
    monkeypatch.setattr("amo_gateway.backends.postgres.asyncio", pauses)
    store._listening, store._all_stale = True, False
    with pytest.raises(Stop):
        await store._listen()
    assert pauses.taken == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert (store._listening, store._all_stale, store._changed.is_set()) == (False, True, True)
    lost = _events(caplog)
    assert [(level, name, fields["retry_in"]) for level, name, fields in lost] == [
        (logging.WARNING, "state.listener_lost", p) for p in pauses.taken]
    assert "postgresql://nobody" not in str(lost)  # the connection string (it may carry a password) never leaks


async def test_a_listener_that_connects_marks_everything_stale_and_wakes_the_waiters(opened: Opener) -> None:
    """At open the listener connects before the one full read, which covers everything (nothing left stale);
    a listener that loses its connection and connects again marks everything stale and wakes the waiters."""
    store = await _listening(await opened())
    assert store._all_stale is False
    store._changed.clear()
    async with await psycopg.AsyncConnection.connect(store._url, autocommit=True) as conn:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'")
    for _ in range(100):
        if store._all_stale:
            break
        await asyncio.sleep(0.05)
    assert store._all_stale is True and store._changed.is_set()


async def _listening(store: PgStore) -> PgStore:
    """The store once its listener is connected."""
    for _ in range(200):
        if store._listening:
            return store
        await asyncio.sleep(0.05)
    raise AssertionError("the listener never connected")


async def test_an_outcome_store_is_retried_with_doubling_pauses_within_half_the_lease(
        keys: KeyRing, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The new pair exists nowhere else: a lost connection is retried (0.2 s, doubling, at most 2 s) until half
    the lease has passed, then the error goes up."""
    caplog.set_level(logging.WARNING, logger="amo_gateway.state")
    clock = [100.0]
    pauses = Pauses(1000)

    async def pause(seconds: float) -> None:
        await Pauses.sleep(pauses, seconds)
        clock[0] += seconds

    store = PgStore("postgresql://nobody@127.0.0.1:1/none", keys, lease_seconds=20)
    monkeypatch.setattr("amo_gateway.backends.postgres.asyncio", types.SimpleNamespace(sleep=pause))
    monkeypatch.setattr("amo_gateway.backends.postgres.time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    failures = [0]

    async def failing(*_: Any, **__: Any) -> Any:
        failures[0] += 1
        raise StateUnavailable("the PostgreSQL state is unreachable: cut")

    monkeypatch.setattr(store, "_change", failing)
    with pytest.raises(StateUnavailable):
        await store.store_outcomes([Outcome("1", "refreshed"), Outcome("2", "refreshed")], NOW)
    assert pauses.taken == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]  # 9.0 s; one more would pass 100 + 20 / 2
    assert failures[0] == 8
    assert _events(caplog)[0] == (logging.WARNING, "state.store_retry",
                                  {"accounts": 2, "detail": "the PostgreSQL state is unreachable: cut"})
    assert len(_events(caplog)) == 7

    async def once_then_fine(*_: Any, **__: Any) -> Any:
        failures[0] += 1
        if failures[0] == 9:
            raise StateUnavailable("cut again")
        return {"1": _account("1")}

    monkeypatch.setattr(store, "_change", once_then_fine)
    pauses.taken.clear()
    assert await store.store_outcomes([Outcome("1", "refreshed")], NOW) == {"1": _account("1")}
    assert pauses.taken == [0.2]


async def test_opening_migrates_once_and_a_closed_store_says_it_is_not_open(
        opened: Opener, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="amo_gateway.state")
    first = await opened()
    assert _events(caplog) == [(logging.INFO, "state.migrated",
                                {"applied": sorted(p.name for p in MIGRATIONS.glob("*.sql"))})]
    await opened()
    assert len(_events(caplog)) == 1  # the second replica finds every migration applied
    assert first.where == "PostgreSQL (AMO_DATABASE_URL)"
    await first.close()
    with pytest.raises(StateUnavailable, match="the PostgreSQL state is not open"):
        _ = first.pool
    assert first._listener is not None and first._listener.cancelled()


async def test_a_failed_catch_up_keeps_what_it_still_has_to_read(opened: Opener) -> None:
    store = await _listening(await opened())
    await store.put_account(_account("1"))
    await store.reload()
    store._stale, store._all_stale = {"1", "2"}, False
    await store.pool.close()
    with pytest.raises(StateUnavailable, match="the PostgreSQL state is unreachable"):
        await store.reload()
    assert store._stale == {"1", "2"} and store.degraded() == "the shared state's database is unreachable"
    store._all_stale = True
    with pytest.raises(StateUnavailable):
        await store.reload()
    assert store._all_stale is True and "1" in (await store.snapshot()).accounts  # the copy keeps serving


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- pg_schema: sealing, errors without secrets, the pool ---

def test_a_row_sealed_under_a_new_key_reloads_the_ring_once(keys: KeyRing) -> None:
    new = KeyRing([Fernet.generate_key().decode()])
    sealed, fp = Sealer(new, None).seal({"a": 1, "b": "é"})
    assert fp == key_fp(new.keys[0]) and Sealer(new, None).primary_fp == fp
    reloads: list[int] = []
    sealer = Sealer(keys, lambda: reloads.append(1) or new)
    assert sealer.open(sealed, fp) == {"a": 1, "b": "é"}
    assert reloads == [1] and sealer.keys is new and sealer.primary_fp == fp
    assert sealer.open(sealed, fp) == {"a": 1, "b": "é"}
    assert reloads == [1]  # a key it knows: no second reload
    with pytest.raises(VaultUndecryptable, match="does not decrypt with the configured vault keys"):
        Sealer(keys, None).open(sealed, fp)


def test_a_key_fingerprint_names_the_key_in_16_hex_digits_without_revealing_it() -> None:
    one, two = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    assert key_fp(one) == hashlib.sha256(one.encode()).hexdigest()[:16]  # the format rows already carry
    assert key_fp(one) != key_fp(two) and one[:16] != key_fp(one)


def test_a_driver_error_is_one_line_without_the_connection_string() -> None:
    assert describe(ValueError("  first line\nsecond line")) == "first line"
    assert describe(ValueError("")) == "ValueError"
    assert describe(ValueError("   ")) == "ValueError"
    leaked = describe(ValueError("cannot reach postgresql://amo:s3cret@db/x or postgres://u:p@h/y now"))
    assert leaked == "cannot reach postgresql://… or postgresql://… now"
    assert describe(ValueError("x" * 400)) == "x" * 300


async def test_a_pool_that_cannot_reach_its_database_says_so_without_the_password() -> None:
    url = f"postgresql://amo:s3cret-pw@127.0.0.1:{_closed_port()}/none?connect_timeout=1"
    started = time.monotonic()
    with pytest.raises(StateUnavailable) as refused:
        await open_pool(url, wait=1.0)
    assert time.monotonic() - started < 10
    assert refused.value.detail.startswith("cannot reach the PostgreSQL database of AMO_DATABASE_URL: ")
    assert "s3cret-pw" not in refused.value.detail


async def test_the_pool_checks_connections_and_grows_to_its_size(database_url: str, postgres: Any) -> None:
    """A database restart costs a failed check, not a failed query: a connection the server cut is replaced."""
    pool = await open_pool(database_url, max_size=3)
    try:
        assert (pool.min_size, pool.max_size, pool.name) == (1, 3, "amo-gateway")
        assert (pool.timeout, pool.reconnect_timeout) == (10.0, 60.0)  # waits for a connection; retries a minute
        conns = [await pool.getconn() for _ in range(3)]
        for conn in conns:
            await pool.putconn(conn)
        with psycopg.connect(postgres.admin_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                          (database_url.rsplit("/", 1)[1],))
        for _ in range(3):
            async with pool.connection() as conn:
                assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
    finally:
        await pool.close()


# --- pg_locks: leases across replicas ---

async def test_a_lease_belongs_to_its_holder_and_outlives_a_holder_that_never_gave_it_back(opened: Opener) -> None:
    store = await opened()
    one, two = PgRefreshLocks(store.pool, 0.5), PgRefreshLocks(store.pool, 0.5)
    assert await one.try_hold("1") is True
    assert await two.try_hold("1") is False
    assert not two._local("1").locked()  # refused: this replica's own lock was given back
    await two._give_back("1")  # only the holder's release deletes a lease
    assert await two.try_hold("1") is False
    await asyncio.sleep(0.6)  # one "died" holding it: its lease expires
    assert await two.try_hold("1") is True
    await two.release("1")
    assert not two._local("1").locked()
    assert await two.try_hold_many(["1", "1", "2"]) == ["1", "2"]
    assert await one.try_hold_many(["1", "2", "3"]) == ["3"]
    assert [one._local(a).locked() for a in "123"] == [True, False, True]  # "1" since its first try_hold
    await two.release_many(["1", "2"])
    assert not two._local("1").locked() and not two._local("2").locked()
    assert await PgRefreshLocks(store.pool, 0.5).try_hold_many(["1", "2"]) == ["1", "2"]


async def test_hold_waits_for_another_replicas_lease_then_takes_it(opened: Opener) -> None:
    store = await opened()
    one, two = PgRefreshLocks(store.pool, 30), PgRefreshLocks(store.pool, 30)
    assert await one.try_hold("1") is True
    entered: list[float] = []

    async def wait_for_it() -> None:
        async with two.hold("1"):
            entered.append(time.monotonic())

    waiter = asyncio.ensure_future(wait_for_it())
    await asyncio.sleep(0.3)
    assert entered == []
    released = time.monotonic()
    await one.release("1")
    await asyncio.wait_for(waiter, 5)
    assert 0 <= entered[0] - released < 2
    assert await one.try_hold("1") is True  # hold gave its lease back on the way out


async def test_leases_without_their_database_fail_loudly_or_are_left_to_expire(
        opened: Opener, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="amo_gateway.state")
    store = await opened()
    locks = PgRefreshLocks(store.pool, 7)
    assert await locks.try_hold("1") is True
    assert await locks.try_hold_many(["2", "3"]) == ["2", "3"]
    await store.pool.close()
    assert await locks.try_hold_many(["1", "2"]) == []  # all held in this process already: nothing to ask
    await locks.release("1")
    await locks.release_many(["2", "3"])
    assert not any(locks._local(a).locked() for a in "123")
    assert [(lvl, name, {k: v for k, v in f.items() if k != "detail"}) for lvl, name, f in _events(caplog)] == [
        (logging.WARNING, "state.lease_kept", {"account": "1", "expires_in": 7}),
        (logging.WARNING, "state.lease_kept", {"accounts": 2, "expires_in": 7})]
    assert [f["detail"] for _, _, f in _events(caplog)] == ["the pool 'amo-gateway' is already closed"] * 2
    with pytest.raises(StateUnavailable, match=r"^the database is unreachable: " + CLOSED):
        await locks.try_hold("4")
    with pytest.raises(StateUnavailable, match=r"^the database is unreachable: " + CLOSED):
        await locks.try_hold_many(["5", "6"])
    assert not any(locks._local(a).locked() for a in "456")


async def test_reads_query_nothing_while_nothing_was_announced_and_catch_up_at_most_every_recheck(
        opened: Opener) -> None:
    store = await _listening(await opened())
    await store.put_account(_account("1"))
    await store.reload()
    fetched: list[Any] = []
    original = store._fetch

    async def counting(query: Any, params: Any) -> Any:
        fetched.append(params)
        return await original(query, params)

    store._fetch = counting  # type: ignore[method-assign]
    for _ in range(20):
        assert (await store.account("1")) is not None
    assert fetched == []  # the listener is up and nobody announced a change: the copy is current
    await store.snapshot()
    store._stale = {"1"}  # announced, but the last catch-up was a moment ago
    store._checked_at = time.monotonic()
    await store.snapshot()
    assert fetched == []
    await asyncio.sleep(RECHECK + 0.02)
    await store.snapshot()
    assert fetched == [(["1"],)] and store._stale == set()


async def test_our_own_write_is_in_the_copy_at_once(opened: Opener) -> None:
    """Readers of this process see its committed write before any catch-up (the copy is changed in place)."""
    store = await opened()
    copy = store._data
    assert copy is not None
    await store.put_account(_account("9"))
    assert store._data is copy and copy.accounts["9"] == _account("9")
    await store.forget("9")
    assert "9" not in copy.accounts


async def test_a_database_lost_on_the_read_path_is_logged_once_and_the_copy_keeps_serving(
        opened: Opener, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="amo_gateway.state")
    store = await _listening(await opened())
    await store.put_account(_account("1"))
    await store.reload()
    await store.pool.close()
    caplog.clear()
    for _ in range(3):
        store._stale, store._checked_at = {"1"}, float("-inf")  # announced: the read tries to catch up
        assert "1" in (await store.snapshot()).accounts
        await asyncio.sleep(0)
    assert _events(caplog) == [(logging.ERROR, "state.unreachable", {
        "detail": "the PostgreSQL state is unreachable: the pool 'amo-gateway' is already closed",
        "serving": "cached accounts until their access tokens expire"})]
    assert store.degraded() is not None
    assert store._retry is not None  # while unhealthy, catching up is left to one background task


async def test_a_migration_the_database_refuses_says_so(
        opened: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    async def refused(_: Any) -> list[str]:
        raise psycopg.OperationalError("permission denied for schema public")

    monkeypatch.setattr("amo_gateway.backends.postgres.migrate", refused)
    with pytest.raises(StateUnavailable) as raised:
        await opened()
    assert raised.value.detail == "cannot migrate the PostgreSQL state: permission denied for schema public"


async def test_an_operator_tool_gets_a_migrated_and_read_store_that_is_closed_afterwards(
        database_url: str, keys: KeyRing) -> None:
    async with opened_store(database_url, keys) as store:
        await store.put_account(_account("7"))
        assert set((await store.snapshot()).accounts) == {"7"}
    with pytest.raises(StateUnavailable, match="not open"):
        _ = store.pool
    async with opened_store(database_url, keys) as again:
        assert set((await again.snapshot()).accounts) == {"7"}  # read on opening


async def test_a_batch_claim_passes_over_a_row_in_use_and_a_waiting_claim_waits_for_it(
        opened: Opener, database_url: str) -> None:
    store = await opened()
    for account_id in ("1", "2"):
        await store.put_account(_account(account_id))
    locker = await psycopg.AsyncConnection.connect(database_url)
    try:
        await locker.execute("SELECT 1 FROM amo_accounts WHERE account_id = '1' FOR UPDATE")
        claims = await asyncio.wait_for(store.claim(["1", "2"], NOW + 3500, 600, None, skip_locked=True), 5)
        assert [c[0].account_id for c in claims] == ["2"]
        waiting = asyncio.ensure_future(store.claim(["1"], NOW + 3500, 600, None, skip_locked=False))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await locker.commit()
        assert [c[0].account_id for c in await asyncio.wait_for(waiting, 5)] == ["1"]
    finally:
        await locker.close()


async def test_a_transient_failure_stored_in_the_database_records_when_failing_began(opened: Opener) -> None:
    store = await opened()
    await store.put_account(_account("1"))
    await store.claim(["1"], NOW + 3500, 600, None, skip_locked=True)
    failure = Outcome("1", "transient", error=UpstreamUnavailable("amoCRM failed with HTTP 502"))
    stored = await store.store_outcomes([failure], NOW + 3501)
    assert (stored["1"].failing_since, stored["1"].last_error) == (NOW + 3501, "amoCRM failed with HTTP 502")
    assert (await (await opened()).reload()).accounts["1"].failing_since == NOW + 3501


async def test_an_account_added_or_forgotten_by_another_replica_is_caught_up_from_its_note(opened: Opener) -> None:
    reader, writer = await _listening(await opened()), await opened()
    await reader.reload()

    async def seen_after_note(account_id: str) -> bool:
        for _ in range(200):  # until the NOTIFY names the account
            if account_id in reader._stale:
                break
            await asyncio.sleep(0.02)
        reader._checked_at = float("-inf")
        return account_id in (await reader.snapshot()).accounts

    await writer.put_account(_account("9"))
    assert await seen_after_note("9") is True  # an account this replica had never seen
    await writer.forget("9")
    assert await seen_after_note("9") is False  # and gone again


async def test_reserving_an_exchange_drops_spent_slots_and_expired_states(opened: Opener) -> None:
    store = await opened()
    await store.reserve_exchange("a", NOW, NOW + 300, "s1", _pending("1"))
    await store.reserve_exchange("b", NOW + 700, NOW + 1000, "s2", _pending("2"))  # "a" spent, "s1" expired
    exported = await store.export_all()
    assert exported.exchange_slots == {"b": NOW + 1000} and set(exported.states) == {"s2"}


async def test_a_refresh_on_demand_waits_for_a_row_in_use_instead_of_skipping_it(
        opened: Opener, database_url: str) -> None:
    """The refresh lock keeps other claimers out, but a connect or forget may hold the row for a moment: the
    caller who needs a fresh token waits for it (FOR UPDATE), unlike the scheduler's batch (SKIP LOCKED)."""
    store = await opened()
    await store.put_account(scripted_account())
    amo = ScriptedAmo(answer(2))
    manager = TokenManager(store, amo, store.refresh_locks(), FakeClock(DUE), margin=600)  # type: ignore[arg-type]
    locker = await psycopg.AsyncConnection.connect(database_url)
    try:
        await locker.execute("SELECT 1 FROM amo_accounts WHERE account_id = %s FOR UPDATE", (SCRIPTED_ID,))
        refresh = asyncio.ensure_future(manager.refresh(SCRIPTED_ID))
        await asyncio.sleep(0.3)
        assert not refresh.done() and amo.sent == []
        await locker.commit()
        outcome = await asyncio.wait_for(refresh, 5)
    finally:
        await locker.close()
    assert outcome.result == "refreshed" and len(amo.sent) == 1


@pytest.mark.parametrize("read", ["peek_state", "pop_state"])
async def test_reading_a_state_under_a_key_the_ring_holds_reads_no_key_file(opened: Opener, read: str) -> None:
    """A peek, and the callback's pop of its state, open the row with the key it names: no key-file read."""
    await (await opened()).add_state("s", _pending("s"), NOW)
    reloads: list[int] = []
    reader = await opened(None, lambda: reloads.append(1) or KeyRing([]))
    assert await getattr(reader, read)("s") == _pending("s") and reloads == []


async def test_the_schedulers_batch_passes_over_a_row_in_use_and_refreshes_the_rest(
        opened: Opener, database_url: str) -> None:
    """The scheduler's batch claims with SKIP LOCKED: a row a connect or forget holds is skipped this round,
    the batch's other accounts are refreshed at once, and nothing waits on the row."""
    store = await opened()
    await store.put_account(scripted_account())
    await store.put_account(scripted_account(account_id="43"))
    amo = ScriptedAmo(answer(2))
    manager = TokenManager(store, amo, store.refresh_locks(), FakeClock(DUE), margin=600)  # type: ignore[arg-type]
    locker = await psycopg.AsyncConnection.connect(database_url)
    try:
        await locker.execute("SELECT 1 FROM amo_accounts WHERE account_id = %s FOR UPDATE", (SCRIPTED_ID,))
        outcomes = await asyncio.wait_for(manager.refresh_due([SCRIPTED_ID, "43"]), 3)
    finally:
        await locker.close()
    assert sorted((o.account_id, o.result) for o in outcomes) == [("42", "skipped"), ("43", "refreshed")]
    assert amo.sent == [(scripted_account().base_url, "refresh-1")]


async def test_lease_statements_wait_for_a_pool_connection_only_briefly(
        opened: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every pooled connection busy, taking or giving back leases gives up after CONNECT_WAIT, not the
    pool's own longer wait: /token's 503 with the database gone depends on it (a refresher batch holds the
    account's lock meanwhile)."""
    from amo_gateway.backends import pg_locks

    store = await opened()
    monkeypatch.setattr(pg_locks, "CONNECT_WAIT", 0.2)
    locks = PgRefreshLocks(store.pool, 30)
    assert await locks.try_hold_many(["1"]) == ["1"]
    assert await locks.try_hold("2") is True
    async with _every_connection_busy(store):
        for attempt in (lambda: locks.try_hold_many(["3"]), lambda: locks.release_many(["1"]),
                        lambda: locks.release("2")):
            started = time.monotonic()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(attempt(), 10)
            assert time.monotonic() - started < 1.5


@contextlib.asynccontextmanager
async def _every_connection_busy(store: PgStore) -> AsyncIterator[None]:
    """Every connection of the store's pool checked out for the duration of the block."""
    busy = [await store.pool.getconn(timeout=5) for _ in range(store.pool.max_size)]
    try:
        yield
    finally:
        for conn in busy:
            await store.pool.putconn(conn)


async def test_forgetting_an_account_waits_for_its_row_in_use_instead_of_missing_it(
        opened: Opener, database_url: str) -> None:
    """Only the scheduler's batch skips locked rows: a forget waits for the claim holding the row, then deletes."""
    store = await opened()
    await store.put_account(_account("1"))
    locker = await psycopg.AsyncConnection.connect(database_url)
    try:
        await locker.execute("SELECT 1 FROM amo_accounts WHERE account_id = '1' FOR UPDATE")
        forgetting = asyncio.ensure_future(store.forget("1"))
        await asyncio.sleep(0.3)
        assert not forgetting.done()
        await locker.commit()
        assert await asyncio.wait_for(forgetting, 5) is True
    finally:
        await locker.close()
    assert await store.account("1") is None


async def test_a_change_without_its_database_says_why_in_one_line(opened: Opener) -> None:
    store = await opened()
    await store.pool.close()
    with pytest.raises(StateUnavailable, match=r"^the PostgreSQL state is unreachable: " + CLOSED):
        await store.put_account(_account("1"))


def test_a_row_no_configured_key_opens_is_refused_with_what_to_check(keys: KeyRing) -> None:
    sealed, fp = Sealer(KeyRing([Fernet.generate_key().decode()]), None).seal({"a": 1})
    with pytest.raises(VaultUndecryptable) as refused:
        Sealer(keys, None).open(sealed, fp)
    assert str(refused.value) == ("a row of the shared state does not decrypt with the configured vault keys "
                                  "(wrong key, or a key dropped too early); it was left untouched")


def _xmins(url: str) -> dict[str, int]:
    """Each row's xmin: the transaction that last wrote it (an UPDATE, even to the same values, changes it)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT 'a' || account_id, xmin::text FROM amo_accounts UNION ALL "
                            "SELECT 's' || state_key, xmin::text FROM amo_states UNION ALL "
                            "SELECT 'x' || slot, xmin::text FROM amo_exchange_slots").fetchall()
    return {key: int(xmin) for key, xmin in rows}


async def test_a_change_writes_back_only_the_rows_it_changed(opened: Opener, database_url: str) -> None:
    """Rows a change read but left as they were are not rewritten: no write amplification, no needless note
    telling the other replicas to re-read them."""
    store = await opened()
    for account_id in ("1", "2"):
        await store.put_account(_account(account_id))
    for key in ("s1", "s2"):
        await store.add_state(key, _pending(key), NOW)
    await store._change(lambda data: data.exchange_slots.update({"x1": NOW + 60, "x2": NOW + 60}),
                        slots=["x1", "x2"])
    before = _xmins(database_url)

    def change_one_of_each(data: VaultData) -> None:
        data.accounts["1"] = _account("1").with_pair(TokenPair("a-new", "r-new", NOW + 7200, NOW))
        data.states["s1"] = _pending("changed")
        data.exchange_slots["x1"] = NOW + 120

    await store._change(change_one_of_each, accounts=["1", "2"], states=["s1", "s2"], slots=["x1", "x2"])
    after = _xmins(database_url)
    assert sorted(k for k in before if after[k] != before[k]) == ["a1", "ss1", "xx1"]


async def test_a_full_read_pages_through_a_server_side_cursor(opened: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up reads every account a page at a time on the server's side: 100 000 sealed rows never sit in
    memory at once (README: RSS 318 MiB instead of 807)."""
    from amo_gateway.backends import postgres

    store = await opened()
    for n in range(5):
        await store.put_account(_account(str(n)))
    monkeypatch.setattr(postgres, "_PAGE", 2)
    sizes: list[int] = []
    real = psycopg.AsyncServerCursor.fetchmany

    async def fetchmany(self: psycopg.AsyncServerCursor[Any], size: int = 0) -> list[Any]:
        sizes.append(size)
        return await real(self, size)

    monkeypatch.setattr(psycopg.AsyncServerCursor, "fetchmany", fetchmany)
    assert sorted(await store._read_all()) == ["0", "1", "2", "3", "4"]
    assert sizes == [2, 2, 2, 2]  # 2 + 2 + 1 rows, then an empty page


async def test_a_full_read_waits_only_briefly_for_a_connection_and_says_why(
        opened: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    from amo_gateway.backends import postgres

    store = await opened()
    monkeypatch.setattr(postgres, "READ_WAIT", 0.2)
    async with _every_connection_busy(store):
        started = time.monotonic()
        with pytest.raises(StateUnavailable) as refused:
            await asyncio.wait_for(store._read_all(), 10)
        assert time.monotonic() - started < 1.5
    assert str(refused.value).startswith("the PostgreSQL state is unreachable: couldn't get a connection after 0.")


async def test_a_listener_back_after_a_gap_has_everything_reread_and_said_why_it_went(
        opened: Opener, caplog: pytest.LogCaptureFixture) -> None:
    """A change made while the listener was away is never heard: when it connects again (after 0.5 s, the
    first pause) everything is marked stale once more, even if a reader caught up in the gap meanwhile; and
    the loss is logged with the driver's reason."""
    caplog.set_level(logging.WARNING, logger="amo_gateway.state")
    reader = await _listening(await opened())
    writer = await opened()
    await writer.put_account(_account("1"))
    assert (await reader.snapshot(recheck=True)).accounts["1"].tokens.access_token == "a-1"  # type: ignore[union-attr]
    async with await psycopg.AsyncConnection.connect(reader._url, autocommit=True) as conn:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'")
    lost_at = time.monotonic()
    for _ in range(500):
        if not reader._listening:
            break
        await asyncio.sleep(0.01)
    await reader.snapshot(recheck=True)  # a reader catches up in the gap: nothing stale any more
    changed = _account("1").with_pair(TokenPair("a-2", "r-2", expires_at=NOW + 7200, obtained_at=NOW))
    await writer.put_account(changed)  # its note reaches nobody
    await _listening(reader)
    assert time.monotonic() - lost_at < 1.3  # the pause after a connection that worked is 0.5 s again
    reader._checked_at = float("-inf")  # past the read throttle
    assert (await reader.snapshot()).accounts["1"] == changed
    lost = [(level, fields) for level, name, fields in _events(caplog) if name == "state.listener_lost"]
    assert len(lost) == 2  # the reader's listener and the writer's: every LISTEN backend was terminated
    assert all(level == logging.WARNING and fields["retry_in"] == 0.5 for level, fields in lost)
    assert all("server closed the connection unexpectedly" in fields["detail"] for _, fields in lost)


async def test_a_store_opens_its_pool_at_its_size_and_one_never_opened_says_so(
        database_url: str, keys: KeyRing) -> None:
    unopened = PgStore(database_url, keys)
    with pytest.raises(StateUnavailable, match=r"^the PostgreSQL state is not open$"):
        unopened.pool  # noqa: B018 - the property is the check
    store = PgStore(database_url, keys, pool_size=3)
    await store.open()
    try:
        assert store.pool.max_size == 3
    finally:
        await store.close()


async def test_a_listener_slow_to_subscribe_does_not_hold_up_opening(
        database_url: str, keys: KeyRing, monkeypatch: pytest.MonkeyPatch) -> None:
    """open() waits READ_WAIT for the LISTEN, then reads anyway: a listener that connects later re-reads
    everything, as after a gap."""
    from amo_gateway.backends import postgres

    async def never_subscribes(self: PgStore) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(postgres, "READ_WAIT", 0.2)
    monkeypatch.setattr(PgStore, "_listen", never_subscribes)
    store = PgStore(database_url, keys)
    started = time.monotonic()
    await asyncio.wait_for(store.open(), 10)
    try:
        assert time.monotonic() - started < 5 and not store._listening
        await store.put_account(_account("1"))
        assert "1" in (await store.snapshot()).accounts
    finally:
        await store.close()
