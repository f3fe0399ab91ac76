"""Refresh locks across replicas: an asyncio lock per account in this process, then a lease row in PostgreSQL.

A lease is committed before the claim and survives the holder's connection: a replica cut off from the
database mid-refresh keeps the account for `lease_seconds`, longer than its amoCRM calls can last, so no
other replica sends the same refresh token meanwhile. A holder that died leaves an expired lease (and an
in-flight marker, which the next claimer reads as a possibly lost answer, exactly as after a crash on one
machine). Lease times are the database's clock, the one clock all replicas share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Sequence

import psycopg

from amo_gateway.backends.pg_schema import Pool, describe
from amo_gateway.errors import StateUnavailable
from amo_gateway.logs import event

log = logging.getLogger("amo_gateway.state")
_POLL = 0.05
# Seconds a lease statement waits for a pooled connection (the pool's own wait is 10 s): with the database away,
# a refresh fails with StateUnavailable (/token: 503) in about this long instead of holding the account's lock,
# and every caller queued behind it, for the pool's whole wait (found by scripts/replicas.py: /token hung 14 s).
CONNECT_WAIT = 2.0

_TAKE = """
INSERT INTO amo_refresh_leases (account_id, holder, until)
VALUES (%(account)s, %(holder)s, clock_timestamp() + make_interval(secs => %(seconds)s))
ON CONFLICT (account_id) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until
    WHERE amo_refresh_leases.until < clock_timestamp()
RETURNING 1
"""


_TAKE_MANY = """
INSERT INTO amo_refresh_leases (account_id, holder, until)
SELECT account_id, %(holder)s, clock_timestamp() + make_interval(secs => %(seconds)s)
FROM unnest(%(accounts)s::text[]) AS account_id
ON CONFLICT (account_id) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until
    WHERE amo_refresh_leases.until < clock_timestamp()
RETURNING account_id
"""


class PgRefreshLocks:
    """Single-flight refresh per account, across coroutines and every replica sharing the database."""

    def __init__(self, pool: Pool, lease_seconds: float) -> None:
        self._pool = pool
        self._seconds = lease_seconds
        self._holder = secrets.token_hex(8)  # this process; a lease names its holder so only it releases it
        self._locks: dict[str, asyncio.Lock] = {}

    def close(self) -> None:
        """Nothing to close: leases live in the database (and expire there)."""

    @contextlib.asynccontextmanager
    async def hold(self, account_id: str) -> AsyncIterator[None]:
        """Wait for the account's lock in this process, then for its lease."""
        async with self._local(account_id):
            while not await self._take(account_id):  # noqa: ASYNC110 - another replica holds it: no Event to wait on
                await asyncio.sleep(_POLL)
            try:
                yield
            finally:
                await self._give_back(account_id)

    async def try_hold(self, account_id: str) -> bool:
        local = self._local(account_id)
        if local.locked():
            return False
        await local.acquire()
        try:
            taken = await self._take(account_id)
        except BaseException:
            local.release()
            raise
        if not taken:
            local.release()
        return taken

    async def release(self, account_id: str) -> None:
        try:
            await self._give_back(account_id)
        finally:
            self._local(account_id).release()

    async def try_hold_many(self, account_ids: Sequence[str]) -> list[str]:
        """One statement for the whole batch: leases taken for the accounts no live lease holds."""
        local = [a for a in dict.fromkeys(account_ids) if not self._local(a).locked()]
        for account_id in local:
            await self._local(account_id).acquire()  # uncontended: returns without suspending
        try:
            taken = set(await self._take_many(local)) if local else set()
        except BaseException:
            for account_id in local:
                self._local(account_id).release()
            raise
        for account_id in local:
            if account_id not in taken:
                self._local(account_id).release()
        return [a for a in local if a in taken]

    async def release_many(self, account_ids: Sequence[str]) -> None:
        try:
            await self._give_back_many(list(account_ids))
        finally:
            for account_id in account_ids:
                self._local(account_id).release()

    def _local(self, account_id: str) -> asyncio.Lock:
        return self._locks.setdefault(account_id, asyncio.Lock())

    async def _take(self, account_id: str) -> bool:
        try:
            async with self._pool.connection(timeout=CONNECT_WAIT) as conn:
                cur = await conn.execute(_TAKE, {"account": account_id, "holder": self._holder,
                                                 "seconds": self._seconds})
                return await cur.fetchone() is not None
        except psycopg.Error as err:
            raise StateUnavailable(f"the database is unreachable: {describe(err)}") from None

    async def _take_many(self, account_ids: list[str]) -> list[str]:
        try:
            async with self._pool.connection(timeout=CONNECT_WAIT) as conn:
                cur = await conn.execute(_TAKE_MANY, {"accounts": account_ids, "holder": self._holder,
                                                      "seconds": self._seconds})
                return [row[0] for row in await cur.fetchall()]
        except psycopg.Error as err:
            raise StateUnavailable(f"the database is unreachable: {describe(err)}") from None

    async def _give_back_many(self, account_ids: list[str]) -> None:
        try:
            async with self._pool.connection(timeout=CONNECT_WAIT) as conn:
                await conn.execute("DELETE FROM amo_refresh_leases WHERE account_id = ANY(%s) AND holder = %s",
                                   (account_ids, self._holder))
        except psycopg.Error as err:
            event(log, "state.lease_kept", level=logging.WARNING, accounts=len(account_ids), detail=describe(err),
                  expires_in=self._seconds)

    async def _give_back(self, account_id: str) -> None:
        """Best effort: a lease that cannot be deleted now simply expires."""
        try:
            async with self._pool.connection(timeout=CONNECT_WAIT) as conn:
                await conn.execute("DELETE FROM amo_refresh_leases WHERE account_id = %s AND holder = %s",
                                   (account_id, self._holder))
        except psycopg.Error as err:
            event(log, "state.lease_kept", level=logging.WARNING, account=account_id, detail=describe(err),
                  expires_in=self._seconds)
