"""The PostgreSQL backend of StateStore: every operation is one short transaction over the rows it locks.

Each operation loads the rows it touches under a lock (`FOR UPDATE`, or `FOR UPDATE SKIP LOCKED` for the
scheduler's batches; an advisory transaction lock for an exchange slot that may not exist yet), runs the
same pure change function the file backend runs (`_claim`, `_apply`, `_reserve`, …) over just those rows,
and writes back what changed before committing. So a claim's in-flight marker is committed before amoCRM
is called, an outcome is committed before anyone is handed the new pair, and a previous marker found by
a claim is the same lost-answer evidence as in the vault file.

Reads (`snapshot`, `account`) come from an in-process copy of the accounts, kept current by LISTEN/NOTIFY:
every write names the accounts it changed, every replica re-reads just those rows. While the database is
unreachable the copy keeps serving (an access token stays valid until it expires); writes fail with
StateUnavailable, and probes (`recheck`) say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import sql

from amo_gateway.backends.base import Claim
from amo_gateway.backends.pg_answers import SharedAnswers
from amo_gateway.backends.pg_locks import PgRefreshLocks
from amo_gateway.backends.pg_rate import SharedLimiters
from amo_gateway.backends.pg_schema import Pool, Sealer, describe, migrate, open_pool
from amo_gateway.errors import StateUnavailable
from amo_gateway.flows import _add_state, _forget, _pop_state, _release, _reserve
from amo_gateway.logs import event
from amo_gateway.manager import _apply, _claim
from amo_gateway.tokens import Account, PendingState, VaultData
from amo_gateway.vault import KeyRing, Unchanged

if TYPE_CHECKING:
    from amo_gateway.manager import Outcome

T = TypeVar("T")
Conn = psycopg.AsyncConnection[tuple[Any, ...]]
log = logging.getLogger("amo_gateway.state")
CHANNEL = "amo_gateway_state"
RECHECK = 0.05  # seconds between catch-ups of the in-process copy on the read path (as the file backend)
RECENT_OVERLAP = datetime.timedelta(seconds=5)  # a row's updated_at is taken before its transaction commits
# (a probe re-reads rows written since 5 s before the previous probe: a transaction longer than that is not seen
# by the probe, only by its NOTIFY)
READ_WAIT = 2.0  # seconds a read waits for a connection: a probe of a database that is down answers in time
_PAGE = 2000  # rows per fetch of a full read
_NOTIFY_LIMIT = 7000  # bytes; PostgreSQL caps a payload at 8000, a larger change says "everything"

_LOCK_ACCOUNTS = "SELECT account_id, sealed, key_fp FROM amo_accounts WHERE account_id = ANY(%s) " \
                 "ORDER BY account_id FOR UPDATE"
_LOCK_ACCOUNTS_SKIPPING = _LOCK_ACCOUNTS + " SKIP LOCKED"
_UPSERT_ACCOUNT = """
INSERT INTO amo_accounts (account_id, sealed, key_fp) VALUES (%s, %s, %s)
ON CONFLICT (account_id) DO UPDATE SET sealed = EXCLUDED.sealed, key_fp = EXCLUDED.key_fp,
    updated_at = clock_timestamp()
"""
_UPSERT_STATE = """
INSERT INTO amo_states (state_key, sealed, key_fp, expires_at) VALUES (%s, %s, %s, %s)
ON CONFLICT (state_key) DO UPDATE SET sealed = EXCLUDED.sealed, key_fp = EXCLUDED.key_fp,
    expires_at = EXCLUDED.expires_at
"""
_UPSERT_SLOT = """
INSERT INTO amo_exchange_slots (slot, until) VALUES (%s, %s)
ON CONFLICT (slot) DO UPDATE SET until = EXCLUDED.until
"""


class PgStore:
    """Shared state for N gateway replicas in one PostgreSQL database (AMO_DATABASE_URL)."""

    def __init__(self, url: str, keys: KeyRing, key_source: Callable[[], KeyRing] | None = None, *,
                 lease_seconds: float = 35.0, pool_size: int = 10) -> None:
        self._url = url
        self._sealer = Sealer(keys, key_source)
        self._lease_seconds = lease_seconds
        self._pool_size = pool_size
        self._pool: Pool | None = None
        self._writer = secrets.token_hex(8)  # names this process's notifications, so it skips its own
        self._data: VaultData | None = None
        self._stale: set[str] = set()
        self._all_stale = True
        self._checked_at = float("-inf")
        self._changed = asyncio.Event()
        self._listening = False
        self._subscribed = asyncio.Event()  # set while LISTEN is in effect
        self._listener: asyncio.Task[None] | None = None
        self._healthy = True
        self._retry: asyncio.Task[None] | None = None
        self._seen_upto: datetime.datetime | None = None  # the database's clock at the last catch-up

    @property
    def keys(self) -> KeyRing:
        return self._sealer.keys

    @property
    def where(self) -> str:
        return "PostgreSQL (AMO_DATABASE_URL)"

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            raise StateUnavailable("the PostgreSQL state is not open")
        return self._pool

    async def open(self) -> None:
        """Connect, apply the migrations this database lacks (advisory lock), listen, read every account.

        Listening first: the one full read then covers every write before the LISTEN, the notifications every
        write after it. (Listening after the read left a gap the listener closed with a second full read on the
        first request: 12 s more at 100 000 accounts.)
        """
        self._pool = await open_pool(self._url, max_size=self._pool_size)
        try:
            applied = await migrate(self._pool)
        except psycopg.OperationalError as err:
            raise StateUnavailable(f"cannot migrate the PostgreSQL state: {describe(err)}") from None
        if applied:
            event(log, "state.migrated", applied=applied)
        self._listener = asyncio.create_task(self._listen(), name="amo-gateway-state-listener")
        with contextlib.suppress(TimeoutError):  # not listening yet: its connect re-reads everything, as after a gap
            await asyncio.wait_for(self._subscribed.wait(), READ_WAIT)
        try:
            await self.reload()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for task in (self._listener, self._retry):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # --- reads: the in-process copy ---

    async def snapshot(self, *, recheck: bool = False) -> VaultData:
        """The accounts as last caught up; `recheck` proves the database answers (probes) and catches up now.

        With the listener up and nothing announced, the copy is current and no query is made. While the
        database is away readers get the copy at once (an access token in it stays valid until it expires)
        and one background task keeps trying to catch up.
        """
        if self._data is None or recheck:
            self._checked_at = time.monotonic()
            return await self._catch_up(probe=recheck)
        now = time.monotonic()
        if self._behind() and now - self._checked_at >= RECHECK:
            self._checked_at = now
            if self._healthy:
                await self._try_catch_up()
            elif self._retry is None or self._retry.done():
                self._retry = asyncio.create_task(self._try_catch_up(), name="amo-gateway-state-catch-up")
        return self._data

    def degraded(self) -> str | None:
        return None if self._healthy else "the shared state's database is unreachable"

    def _behind(self) -> bool:
        return self._all_stale or bool(self._stale)

    async def _try_catch_up(self) -> None:
        """A reader's catch-up: a failure is not raised but logged, once, when the database was reachable before.

        (`_catch_up` marks the store unhealthy itself, so whether it was healthy is read before calling it.)
        """
        was_healthy = self._healthy
        try:
            await self._catch_up(probe=False)
        except StateUnavailable as err:
            if was_healthy:
                event(log, "state.unreachable", level=logging.ERROR, detail=err.detail,
                      serving="cached accounts until their access tokens expire")

    async def reload(self) -> VaultData:
        """Caught up now, without waiting for announcements: what was announced, and every row written lately.

        Costs one indexed query, not a read of every account: a miss (`?account=` nobody has) may call it.
        """
        return await self._catch_up(probe=True)

    async def account(self, account_id: str) -> Account | None:
        return (await self.snapshot()).accounts.get(account_id)

    async def _catch_up(self, *, probe: bool) -> VaultData:
        """Re-read what others changed: every account after a gap in notifications, else just the named ones."""
        try:
            data = await self._read_changes(probe)
        except StateUnavailable:
            self._healthy = False
            raise
        self._healthy = True
        return data

    async def _read_changes(self, probe: bool) -> VaultData:
        """Everything after a gap in notifications; else the announced rows, and with `probe` the recent ones."""
        if self._all_stale or self._data is None:
            self._all_stale = False
            self._stale.clear()
            try:
                started = (await self._fetch("SELECT clock_timestamp()", ()))[0][0]
                accounts = await self._read_all()
            except StateUnavailable:
                self._all_stale = True
                raise
            self._data = VaultData(accounts=accounts)
            self._seen_upto = started  # the next probe re-reads rows written since shortly before this read
            return self._data
        if self._stale:
            ids, self._stale = sorted(self._stale), set()
            await self._refetch(ids)
        if probe:  # a write whose NOTIFY is still on its way (or lost): rows changed since just before the last seen
            assert self._seen_upto is not None
            rows = await self._fetch("SELECT account_id, sealed, key_fp, clock_timestamp() FROM amo_accounts "
                                     "WHERE updated_at > %s UNION ALL SELECT NULL, NULL, NULL, clock_timestamp()",
                                     (self._seen_upto - RECENT_OVERLAP,))
            self._data.accounts.update({r[0]: self._account(r) for r in rows if r[0] is not None})
            self._seen_upto = rows[-1][3]
        return self._data

    async def _read_all(self) -> dict[str, Account]:
        """Every account, a page at a time through a server-side cursor: one snapshot, as one SELECT, but the
        sealed rows of 100 000 accounts never sit in memory all at once (they set the process's RSS)."""
        accounts: dict[str, Account] = {}
        try:
            async with self.pool.connection(timeout=READ_WAIT) as conn, conn.cursor(name="amo_read_all") as cur:
                await cur.execute("SELECT account_id, sealed, key_fp FROM amo_accounts")
                while rows := await cur.fetchmany(_PAGE):
                    accounts.update((r[0], self._account(r)) for r in rows)
        except psycopg.OperationalError as err:
            raise StateUnavailable(f"the PostgreSQL state is unreachable: {describe(err)}") from None
        return accounts

    async def _refetch(self, ids: list[str]) -> None:
        try:
            rows = await self._fetch("SELECT account_id, sealed, key_fp FROM amo_accounts WHERE account_id = ANY(%s)",
                                     (ids,))
        except StateUnavailable:
            self._stale.update(ids)
            raise
        assert self._data is not None
        accounts = self._data.accounts  # changed in place (O(changes), not O(accounts)): readers iterate it
        for account_id in ids:  # synchronously, so no reader ever sees it change under its loop
            accounts.pop(account_id, None)
        accounts.update({r[0]: self._account(r) for r in rows})

    async def _fetch(self, query: str | sql.Composed, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            async with self.pool.connection(timeout=READ_WAIT) as conn:
                return await (await conn.execute(query, params)).fetchall()
        except psycopg.OperationalError as err:
            raise StateUnavailable(f"the PostgreSQL state is unreachable: {describe(err)}") from None

    def _account(self, row: tuple[Any, ...]) -> Account:
        return Account.from_dict(self._sealer.open(row[1], row[2]))

    # --- writes: one transaction each, the file backend's pure changes over the locked rows ---

    async def claim(self, account_ids: Sequence[str], now: float, margin: float, seen: str | None, *,
                    skip_locked: bool) -> list[Claim]:
        ids = list(account_ids)
        return await self._change(lambda data: _claim(data, ids, now, margin, seen), accounts=ids,
                                  skip_locked=skip_locked)

    async def store_outcomes(self, outcomes: Sequence[Outcome], now: float) -> dict[str, Account]:
        """Retried through a lost connection: the new pair exists nowhere else, and the lease keeps it ours."""
        ids = [o.account_id for o in outcomes]
        deadline = time.monotonic() + self._lease_seconds / 2
        pause = 0.2
        while True:
            try:
                return await self._change(lambda data: _apply(data, list(outcomes), now), accounts=ids)
            except StateUnavailable as err:
                if time.monotonic() + pause > deadline:
                    raise
                event(log, "state.store_retry", level=logging.WARNING, accounts=len(ids), detail=err.detail)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def put_account(self, account: Account) -> None:
        await self._change(lambda data: data.accounts.__setitem__(account.account_id, account),
                           accounts=[account.account_id])

    async def forget(self, account_id: str) -> bool:
        return await self._change(lambda data: _forget(data, account_id), accounts=[account_id])

    async def reserve_exchange(self, slot: str, now: float, until: float, state_key: str,
                               pending: PendingState) -> None:
        await self._change(lambda data: _reserve(data, slot, now, until, state_key, pending),
                           states=[state_key], slots=[slot], prune_at=now)

    async def release_exchange(self, slot: str, state_key: str) -> None:
        await self._change(lambda data: _release(data, slot, state_key), states=[state_key], slots=[slot])

    async def add_state(self, key: str, pending: PendingState, now: float) -> None:
        await self._change(lambda data: _add_state(data, key, pending, now), states=[key], prune_at=now)

    async def peek_state(self, key: str) -> PendingState | None:
        rows = await self._fetch("SELECT sealed, key_fp FROM amo_states WHERE state_key = %s", (key,))
        return PendingState(**self._sealer.open(rows[0][0], rows[0][1])) if rows else None

    async def pop_state(self, key: str) -> PendingState | None:
        return await self._change(lambda data: _pop_state(data, key), states=[key])

    async def _change(self, change: Callable[[VaultData], T | Unchanged[T]], *, accounts: Iterable[str] = (),
                      states: Iterable[str] = (), slots: Iterable[str] = (), skip_locked: bool = False,
                      prune_at: float | None = None) -> T:
        """Lock and load the rows, run `change` over them, write back the difference, commit, then tell others."""
        try:
            async with self.pool.connection() as conn, conn.transaction():
                if prune_at is not None:
                    await _prune(conn, prune_at)
                data = await self._load(conn, sorted(set(accounts)), sorted(set(states)), sorted(set(slots)),
                                        skip_locked)
                before = data.copy()
                result = change(data)
                if isinstance(result, Unchanged):
                    return result.value
                touched = await self._write(conn, before, data)
        except psycopg.OperationalError as err:
            raise StateUnavailable(f"the PostgreSQL state is unreachable: {describe(err)}") from None
        self._stale.update(touched)  # catch up from the rows themselves: another replica may write right after
        self._remember(before, data)
        return result

    async def _load(self, conn: Conn, accounts: list[str], states: list[str], slots: list[str],
                    skip_locked: bool) -> VaultData:
        """The rows, locked in key order (two batches never deadlock); SKIP LOCKED passes over rows in use."""
        data = VaultData()
        if accounts:
            cur = await conn.execute(_LOCK_ACCOUNTS_SKIPPING if skip_locked else _LOCK_ACCOUNTS, (accounts,))
            data.accounts = {r[0]: self._account(r) for r in await cur.fetchall()}
        if states:
            cur = await conn.execute("SELECT state_key, sealed, key_fp FROM amo_states WHERE state_key = ANY(%s) "
                                     "ORDER BY state_key FOR UPDATE", (states,))
            data.states = {r[0]: PendingState(**self._sealer.open(r[1], r[2])) for r in await cur.fetchall()}
        for slot in slots:  # a slot row may not exist yet: FOR UPDATE cannot lock it, an advisory lock can
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('amo-slot:' || %s, 0))", (slot,))
        if slots:
            cur = await conn.execute("SELECT slot, until FROM amo_exchange_slots WHERE slot = ANY(%s)", (slots,))
            data.exchange_slots = {r[0]: float(r[1]) for r in await cur.fetchall()}
        return data

    async def _write(self, conn: Conn, before: VaultData, after: VaultData) -> list[str]:
        """Upsert what changed, delete what went, notify the other replicas; returns the accounts touched."""
        changed = [a for k, a in after.accounts.items() if before.accounts.get(k) is not a]
        gone = [k for k in before.accounts if k not in after.accounts]
        async with conn.cursor() as cur:
            if changed:
                await cur.executemany(_UPSERT_ACCOUNT, [(a.account_id, *self._sealer.seal(a.to_dict()))
                                                        for a in changed])
            new_states = [(k, s) for k, s in after.states.items() if before.states.get(k) != s]
            if new_states:
                await cur.executemany(_UPSERT_STATE, [(k, *self._sealer.seal(dict(vars(s))), s.expires_at)
                                                      for k, s in new_states])
            new_slots = [(k, t) for k, t in after.exchange_slots.items() if before.exchange_slots.get(k) != t]
            if new_slots:
                await cur.executemany(_UPSERT_SLOT, new_slots)
        await _delete(conn, "amo_accounts", "account_id", gone)
        await _delete(conn, "amo_states", "state_key", [k for k in before.states if k not in after.states])
        await _delete(conn, "amo_exchange_slots", "slot",
                      [k for k in before.exchange_slots if k not in after.exchange_slots])
        touched = [a.account_id for a in changed] + gone
        if touched:
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._payload(touched)))
        return touched

    def _payload(self, account_ids: list[str]) -> str:
        text = json.dumps({"w": self._writer, "a": account_ids})
        return text if len(text) < _NOTIFY_LIMIT else json.dumps({"w": self._writer, "all": True})

    def _remember(self, before: VaultData, after: VaultData) -> None:
        """Our own committed write, visible to this process's readers at once."""
        if self._data is None:
            return
        accounts = self._data.accounts  # in place, as in _refetch
        for account_id in before.accounts:
            accounts.pop(account_id, None)
        accounts.update(after.accounts)

    # --- changes made elsewhere ---

    async def wait_for_change(self, poll: float) -> None:
        """Return when another replica changed an account (NOTIFY); without a listener, after `poll` seconds.

        The event is cleared after the wake-up, not on entry: a NOTIFY that arrived while the refresher was busy
        with a round (between its plan and this call) must wake it at once, as a file write does in store.py.
        """
        if not self._listening:
            await asyncio.sleep(poll)
        else:
            await self._changed.wait()
        self._changed.clear()

    async def _listen(self) -> None:
        """LISTEN on a connection of its own, reconnecting forever; a gap means re-reading every account."""
        pause = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._listening, self._all_stale, pause = True, True, 0.5
                    self._subscribed.set()
                    self._changed.set()
                    async for note in conn.notifies():
                        self._heard(note.payload)
            except psycopg.Error as err:
                event(log, "state.listener_lost", level=logging.WARNING, detail=describe(err), retry_in=pause)
            self._listening, self._all_stale = False, True
            self._subscribed.clear()
            self._changed.set()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)

    def _heard(self, payload: str) -> None:
        try:
            note = json.loads(payload)
        except ValueError:
            note = {"all": True}
        if note.get("w") == self._writer:
            return
        if note.get("all"):
            self._all_stale = True
        else:
            self._stale.update(str(a) for a in note.get("a", []))
        self._checked_at = float("-inf")  # the next read catches up, whatever the throttle says
        self._changed.set()

    def refresh_locks(self) -> PgRefreshLocks:
        return PgRefreshLocks(self.pool, self._lease_seconds)

    def limiters(self, limit: int, queue: int, *, window: float) -> SharedLimiters:
        return SharedLimiters(self.pool, limit, queue, window=window)

    def answers(self, window: float, max_bytes: int, *, on_evict: Callable[[], None] | None = None) -> SharedAnswers:
        """Shared answers; the in-memory byte cap does not apply (rows expire with their window instead)."""
        return SharedAnswers(self.pool, self._sealer, window)

    # --- operator tools (migrate-state, rotate-key) ---

    async def export_all(self) -> VaultData:
        """Every account, state and slot, decrypted (migrate-state --to file:)."""
        accounts = await self._fetch("SELECT account_id, sealed, key_fp FROM amo_accounts", ())
        states = await self._fetch("SELECT state_key, sealed, key_fp FROM amo_states", ())
        slots = await self._fetch("SELECT slot, until FROM amo_exchange_slots", ())
        return VaultData(accounts={r[0]: self._account(r) for r in accounts},
                         states={r[0]: PendingState(**self._sealer.open(r[1], r[2])) for r in states},
                         exchange_slots={r[0]: float(r[1]) for r in slots})

    async def import_all(self, data: VaultData) -> None:
        """Upsert everything in `data` in one transaction; rows it does not name are kept (migrate-state)."""
        def merge(target: VaultData) -> None:
            target.accounts.update(data.accounts)
            target.states.update(data.states)
            target.exchange_slots.update(data.exchange_slots)

        await self._change(merge, accounts=data.accounts, states=data.states, slots=data.exchange_slots)

    async def reseal(self, batch: int = 500) -> int:
        """Re-encrypt, in batches of short transactions, every row not sealed by the primary key; returns how many.

        SKIP LOCKED leaves a row a replica is changing right now to a later pass; the passes end when no row
        under an old key is left (a replica that kept writing under the old key is caught on the next pass).
        """
        total = 0
        for table, key in (("amo_accounts", "account_id"), ("amo_states", "state_key")):
            while (done := await self._reseal_batch(table, key, batch)) or await self._old_rows(table):
                total += done
                if not done:
                    await asyncio.sleep(0.05)
        return total

    async def _reseal_batch(self, table: str, key: str, batch: int) -> int:
        primary = self._sealer.primary_fp
        try:
            async with self.pool.connection() as conn, conn.transaction():
                cur = await conn.execute(sql.SQL("SELECT {}, sealed, key_fp FROM {} WHERE key_fp <> %s "
                                                 "LIMIT %s FOR UPDATE SKIP LOCKED").format(
                                                     sql.Identifier(key), sql.Identifier(table)), (primary, batch))
                rows = [(self._sealer.seal(self._sealer.open(r[1], r[2]))[0], primary, r[0])
                        for r in await cur.fetchall()]
                async with conn.cursor() as update:
                    await update.executemany(sql.SQL("UPDATE {} SET sealed = %s, key_fp = %s WHERE {} = %s").format(
                        sql.Identifier(table), sql.Identifier(key)), rows)
        except psycopg.OperationalError as err:
            raise StateUnavailable(f"the PostgreSQL state is unreachable: {describe(err)}") from None
        return len(rows)

    async def _old_rows(self, table: str) -> bool:
        rows = await self._fetch(sql.SQL("SELECT 1 FROM {} WHERE key_fp <> %s LIMIT 1").format(sql.Identifier(table)),
                                 (self._sealer.primary_fp,))
        return bool(rows)


async def _prune(conn: Conn, now: float) -> None:
    """What VaultData.prune does to the file: expired states and spent slots go."""
    await conn.execute("DELETE FROM amo_states WHERE expires_at <= %s", (now,))
    await conn.execute("DELETE FROM amo_exchange_slots WHERE until <= %s", (now,))


async def _delete(conn: Conn, table: str, key: str, values: list[str]) -> None:
    if values:
        await conn.execute(sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(sql.Identifier(table),
                                                                              sql.Identifier(key)), (values,))


@contextlib.asynccontextmanager
async def opened(url: str, keys: KeyRing) -> AsyncIterator[PgStore]:
    """A PgStore for an operator tool: migrated and read, closed afterwards."""
    store = PgStore(url, keys)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
