"""The budget of 401-triggered refreshes shared by every replica (AMO_DATABASE_URL): see refresh_budget.py.

Taking the budget is one statement only one replica can win while it is open: an upsert that moves
`closed_until` forward only when it has passed (the database's clock, the one every replica shares).
"""

from __future__ import annotations

from typing import Any, LiteralString

import psycopg

from amo_gateway.backends.pg_schema import Pool, describe
from amo_gateway.errors import StateUnavailable
from amo_gateway.refresh_budget import RefreshBudget

_TAKE = """
INSERT INTO amo_refresh_budget (account_id, closed_until)
VALUES (%s, clock_timestamp() + make_interval(secs => %s))
ON CONFLICT (account_id) DO UPDATE SET closed_until = EXCLUDED.closed_until
    WHERE amo_refresh_budget.closed_until <= clock_timestamp()
RETURNING 1
"""


class SharedRefreshBudget(RefreshBudget):
    """One 401 refresh budget per account for all replicas; the decision lock stays per process."""

    def __init__(self, pool: Pool, interval: float) -> None:
        super().__init__(interval)
        self._pool = pool

    async def take(self, account_id: str) -> bool:
        return bool(await self._run(_TAKE, (account_id, self.interval), fetch=True))

    async def reopen(self, account_id: str) -> None:
        await self._run("DELETE FROM amo_refresh_budget WHERE account_id = %s", (account_id,))

    async def _run(self, query: LiteralString, params: tuple[Any, ...], *, fetch: bool = False
                   ) -> list[tuple[Any, ...]]:
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(query, params)
                return await cur.fetchall() if fetch else []
        except psycopg.OperationalError as err:
            raise StateUnavailable(f"the shared refresh budget is unreachable: {describe(err)}") from None
