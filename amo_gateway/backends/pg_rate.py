"""One amoCRM budget per account across every replica: the sliding-window log kept in PostgreSQL.

Each replica first queues its callers in FIFO order behind its own asyncio lock (as the in-process limiter
does), so it has at most one caller per account asking the database at a time; there, an advisory
transaction lock per account serialises the replicas in PostgreSQL's own FIFO lock queue, and the send is
admitted only when fewer than `limit` sends of any replica fall in the last window (the database's clock,
the one all replicas share). Replicas take turns, so none starves.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from amo_gateway.backends.pg_schema import Pool, describe
from amo_gateway.errors import StateUnavailable
from amo_gateway.ratelimit import Limiters, SlidingWindowLimiter

_ADMIT = """
WITH gone AS (
    DELETE FROM amo_rate_sends WHERE account_id = %(account)s
        AND sent_at <= clock_timestamp() - make_interval(secs => %(window)s)
)
SELECT count(*), extract(epoch FROM min(sent_at) + make_interval(secs => %(window)s) - clock_timestamp())
FROM amo_rate_sends WHERE account_id = %(account)s
    AND sent_at > clock_timestamp() - make_interval(secs => %(window)s)
"""


class SharedWindowLimiter(SlidingWindowLimiter):
    """At most `limit` sends to amoCRM in any `window` seconds, counted over every replica."""

    def __init__(self, pool: Pool, account_id: str, limit: int, queue: int, *, window: float) -> None:
        super().__init__(limit, queue, window=window)
        self._pool = pool
        self._account = account_id

    async def _take(self) -> None:
        while (wait := await self._try_send()) > 0:  # noqa: ASYNC110 - other replicas free the slot: no Event
            await asyncio.sleep(wait)

    async def _try_send(self) -> float:
        """0 when the send was recorded (go now), else the seconds until the oldest send leaves the window."""
        params: dict[str, Any] = {"account": self._account, "window": self.window}
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('amo-rate:' || %s, 0))",
                                   (self._account,))
                row = await (await conn.execute(_ADMIT, params)).fetchone()
                assert row is not None
                if row[0] >= self.limit:
                    return max(float(row[1] or 0.0), 0.001)
                await conn.execute("INSERT INTO amo_rate_sends (account_id, sent_at) VALUES (%s, clock_timestamp())",
                                   (self._account,))
                return 0.0
        except psycopg.OperationalError as err:
            raise StateUnavailable(f"the shared rate limit is unreachable: {describe(err)}") from None


class SharedLimiters(Limiters):
    """One shared limiter per account, created on first use."""

    def __init__(self, pool: Pool, limit: int, queue: int, *, window: float = 1.0) -> None:
        super().__init__(limit, queue, window=window)
        self._pool = pool

    def _make(self, account_id: str) -> SlidingWindowLimiter:
        return SharedWindowLimiter(self._pool, account_id, self.limit, self.queue, window=self.window)
