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
from collections.abc import AsyncIterator

import psycopg

from amo_gateway.backends.pg_schema import Pool, describe
from amo_gateway.errors import StateUnavailable
from amo_gateway.logs import event

log = logging.getLogger("amo_gateway.state")
_POLL = 0.05

_TAKE = """
INSERT INTO amo_refresh_leases (account_id, holder, until)
VALUES (%(account)s, %(holder)s, clock_timestamp() + make_interval(secs => %(seconds)s))
ON CONFLICT (account_id) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until
    WHERE amo_refresh_leases.until < clock_timestamp()
RETURNING 1
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

    def _local(self, account_id: str) -> asyncio.Lock:
        return self._locks.setdefault(account_id, asyncio.Lock())

    async def _take(self, account_id: str) -> bool:
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(_TAKE, {"account": account_id, "holder": self._holder,
                                                 "seconds": self._seconds})
                return await cur.fetchone() is not None
        except psycopg.Error as err:
            raise StateUnavailable(f"the database is unreachable: {describe(err)}") from None

    async def _give_back(self, account_id: str) -> None:
        """Best effort: a lease that cannot be deleted now simply expires."""
        try:
            async with self._pool.connection() as conn:
                await conn.execute("DELETE FROM amo_refresh_leases WHERE account_id = %s AND holder = %s",
                                   (account_id, self._holder))
        except psycopg.Error as err:
            event(log, "state.lease_kept", level=logging.WARNING, account=account_id, detail=describe(err),
                  expires_in=self._seconds)
