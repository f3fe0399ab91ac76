"""The alert outbox in PostgreSQL (AMO_DATABASE_URL): the file outbox's own OutboxData changes, over rows.

Every step takes the lock on the one row of `amo_alert_outbox` (what the file's `flock` is), loads the rows the
change needs into an OutboxData, runs the very change the file runs (`record`, `claim`, `delivered`, `failed`,
`release`) and writes back the difference before it commits. So replicas raise one alert per state change, and
each delivery is leased to one replica at a time (`lease_until`, on the gateway's clock as in the file): a
replica killed mid-delivery leaves its lease to run out, and whichever replica claims next sends the alert again
with the same `id` (at least once; a receiver drops the repeat by its id). Order per target holds because a
claim takes nothing while the target's first delivery waits (the same rule as the file's).

The rows are plain JSON, like the file: an alert holds no secret (see migrations/0004_alerts_audit.sql).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import AsyncIterator, Sequence
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from amo_gateway.backends.base import Decide
from amo_gateway.backends.pg_schema import Pool, describe
from amo_gateway.errors import StateUnavailable
from amo_gateway.outbox import OutboxData
from amo_gateway.vault import Unchanged

Conn = psycopg.AsyncConnection[tuple[Any, ...]]
_COLUMNS = "id, target, payload, attempts, next_at, lease_until, lease, last_error"
_FIELDS = ("id", "target", "payload", "attempts", "next_at", "lease_until", "lease", "last_error")
_INSERT = ("INSERT INTO amo_alert_deliveries (id, target, payload, attempts, next_at, lease_until, lease, "
           "last_error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)")
_UPDATE = ("UPDATE amo_alert_deliveries SET attempts = %s, next_at = %s, lease_until = %s, lease = %s, "
           "last_error = %s WHERE id = %s AND target = %s")


class PgOutbox:
    """The OutboxStore of replicas sharing one database."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def prepare(self) -> str | None:
        return None  # the migrations made the tables; a row cannot be half written

    async def record(self, decide: Decide, targets: Sequence[str], now: float, max_pending: int
                     ) -> list[dict[str, Any]]:
        async with self._locked() as (conn, box):
            box.pending = await self._deliveries(conn, "TRUE ORDER BY seq", ())  # queue order: drops take the oldest
            rows = await (await conn.execute("SELECT entry FROM amo_alert_history ORDER BY seq")).fetchall()
            box.history = [r[0] for r in rows]
            rows = await (await conn.execute("SELECT key, record FROM amo_alert_active")).fetchall()
            box.active = {r[0]: r[1] for r in rows}
            before = copy.deepcopy(box)
            result = box.record(decide, targets, now, max_pending)
            if isinstance(result, Unchanged):
                return result.value
            await _write(conn, before, box)
            return result

    async def claim(self, target: str, now: float, lease_until: float, owner: str, batch: int
                    ) -> list[dict[str, Any]]:
        if not await self._head_due(target, now):
            return []  # no lock taken: every replica looks at every target each tick
        async with self._locked() as (conn, box):
            box.pending = await self._deliveries(conn, "target = %s ORDER BY seq LIMIT %s", (target, batch))
            before = copy.deepcopy(box)
            taken = box.claim(target, now, lease_until, owner, batch)
            await _write(conn, before, box)
            return taken

    async def delivered(self, entry_id: str, target: str, now: float) -> None:
        async with self._one(entry_id, target, history=True) as box:
            box.delivered(entry_id, target, now)

    async def failed(self, entry_id: str, target: str, retry_at: float, why: str) -> None:
        async with self._one(entry_id, target) as box:
            box.failed(entry_id, target, retry_at, why)

    async def release(self, target: str, entry_ids: Sequence[str], owner: str) -> None:
        if not entry_ids:
            return
        async with self._locked() as (conn, box):
            box.pending = await self._deliveries(conn, "target = %s AND id = ANY(%s) ORDER BY seq",
                                                 (target, list(entry_ids)))
            before = copy.deepcopy(box)
            for entry_id in entry_ids:
                box.release(entry_id, target, owner)
            await _write(conn, before, box)

    async def history(self, account_id: str | None, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT entry FROM amo_alert_history WHERE %s::text IS NULL OR account_id = %s "
                                 "ORDER BY seq DESC LIMIT %s", (account_id, account_id, limit))
        return [r[0] for r in rows]

    async def counts(self) -> tuple[int, int]:
        rows = await self._fetch("SELECT (SELECT count(*) FROM amo_alert_deliveries), dropped FROM amo_alert_outbox",
                                 ())
        return int(rows[0][0]), int(rows[0][1])

    async def _head_due(self, target: str, now: float) -> bool:
        rows = await self._fetch("SELECT next_at, lease_until FROM amo_alert_deliveries WHERE target = %s "
                                 "ORDER BY seq LIMIT 1", (target,))
        return bool(rows) and rows[0][0] <= now and rows[0][1] <= now

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[tuple[Conn, OutboxData]]:
        """One transaction holding the outbox lock; the box starts with the dropped count and nothing else."""
        try:
            async with self._pool.connection() as conn, conn.transaction():
                row = await (await conn.execute("SELECT dropped FROM amo_alert_outbox FOR UPDATE")).fetchone()
                yield conn, OutboxData(dropped=int(row[0]) if row else 0)
        except psycopg.OperationalError as err:
            raise StateUnavailable(f"the shared alert outbox is unreachable: {describe(err)}") from None

    @contextlib.asynccontextmanager
    async def _one(self, entry_id: str, target: str, *, history: bool = False) -> AsyncIterator[OutboxData]:
        """One delivery (and its alert's history entry) to change under the lock; written back afterwards."""
        async with self._locked() as (conn, box):
            box.pending = await self._deliveries(conn, "id = %s AND target = %s", (entry_id, target))
            if history:
                rows = await (await conn.execute("SELECT entry FROM amo_alert_history WHERE id = %s",
                                                 (entry_id,))).fetchall()
                box.history = [r[0] for r in rows]
            before = copy.deepcopy(box)
            yield box
            await _write(conn, before, box)

    @staticmethod
    async def _deliveries(conn: Conn, where: LiteralString, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        query = sql.SQL("SELECT {} FROM amo_alert_deliveries WHERE ").format(sql.SQL(_COLUMNS)) + sql.SQL(where)
        cur = await conn.execute(query, params)
        return [dict(zip(_FIELDS, row, strict=True)) for row in await cur.fetchall()]

    async def _fetch(self, query: LiteralString, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            async with self._pool.connection() as conn:
                return await (await conn.execute(query, params)).fetchall()
        except psycopg.OperationalError as err:
            raise StateUnavailable(f"the shared alert outbox is unreachable: {describe(err)}") from None


async def _write(conn: Conn, before: OutboxData, after: OutboxData) -> None:
    """Write what the change did to the rows it was given: deliveries, history, active record, dropped count."""
    await _write_deliveries(conn, before.pending, after.pending)
    await _write_history(conn, before.history, after.history)
    gone = [k for k in before.active if k not in after.active]
    if gone:
        await conn.execute("DELETE FROM amo_alert_active WHERE key = ANY(%s)", (gone,))
    changed = [(k, Jsonb(v)) for k, v in after.active.items() if before.active.get(k) != v]
    if changed:
        async with conn.cursor() as cur:
            await cur.executemany("INSERT INTO amo_alert_active (key, record) VALUES (%s, %s) ON CONFLICT (key) "
                                  "DO UPDATE SET record = EXCLUDED.record", changed)
    if after.dropped != before.dropped:
        await conn.execute("UPDATE amo_alert_outbox SET dropped = %s", (after.dropped,))


async def _write_deliveries(conn: Conn, before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    old = {(e["id"], e["target"]): e for e in before}
    new = {(e["id"], e["target"]): e for e in after}
    gone = [k for k in old if k not in new]
    for entry_id, target in gone:
        await conn.execute("DELETE FROM amo_alert_deliveries WHERE id = %s AND target = %s", (entry_id, target))
    async with conn.cursor() as cur:
        added = [e for k, e in new.items() if k not in old]  # in queue order: seq keeps it
        if added:
            await cur.executemany(_INSERT, [(*(e[f] for f in _FIELDS[:2]), Jsonb(e["payload"]),
                                             *(e[f] for f in _FIELDS[3:])) for e in added])
        changed = [e for k, e in new.items() if k in old and old[k] != e]
        if changed:
            await cur.executemany(_UPDATE, [(*(e[f] for f in _FIELDS[3:]), e["id"], e["target"]) for e in changed])


async def _write_history(conn: Conn, before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    old = {a["id"]: a for a in before}
    new = {a["id"]: a for a in after}
    gone = [k for k in old if k not in new]
    if gone:
        await conn.execute("DELETE FROM amo_alert_history WHERE id = ANY(%s)", (gone,))
    async with conn.cursor() as cur:
        added = [(a["id"], a.get("account_id"), Jsonb(a)) for k, a in new.items() if k not in old]
        if added:
            await cur.executemany("INSERT INTO amo_alert_history (id, account_id, entry) VALUES (%s, %s, %s)", added)
        changed = [(Jsonb(a), k) for k, a in new.items() if k in old and old[k] != a]
        if changed:
            await cur.executemany("UPDATE amo_alert_history SET entry = %s WHERE id = %s", changed)
