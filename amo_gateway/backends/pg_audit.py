"""The audit trail in PostgreSQL (AMO_DATABASE_URL): one table every replica appends to and reads from.

Lines are the very JSON lines the file version writes (audit.audit_line: secrets only as HMACs), appended in
one transaction per batch under an advisory lock, so `seq` order is the order they were written in, across
replicas, with no gap a reader could see filled later. A trigger refuses any UPDATE: the trail is
append-only. Retention keeps the file's bound, AMO_AUDIT_MAX_BYTES * (AMO_AUDIT_BACKUPS + 1) bytes (a line
counted with its newline): each row carries where it starts and ends in the trail's whole length, and the
rows that begin before the last that many bytes are deleted in the same transaction (the file drops a whole
old file at a time; the table drops the oldest lines).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import psycopg

from amo_gateway.audit_file import Rotation
from amo_gateway.backends.pg_schema import Pool, describe, migrate, open_pool
from amo_gateway.errors import StateUnavailable

AUDIT_LOCK = 0x616D6F6175646974  # "amoaudit": the advisory lock every replica's appender takes


class PgAudit:
    """The AuditSink of replicas sharing one database."""

    def __init__(self, pool: Pool, rotation: Rotation | None = None) -> None:
        self._pool = pool
        rotation = rotation or Rotation()
        self.budget = rotation.max_bytes * (rotation.backups + 1)

    @property
    def where(self) -> str:
        return "PostgreSQL (AMO_DATABASE_URL), table amo_audit"

    async def append(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_LOCK,))
                row = await (await conn.execute("SELECT end_offset FROM amo_audit ORDER BY seq DESC LIMIT 1")
                             ).fetchone()
                offset = int(row[0]) if row else 0
                rows = []
                for line in lines:
                    rows.append((line, offset, offset + len(line.encode()) + 1))
                    offset = rows[-1][2]
                async with conn.cursor() as cur:
                    await cur.executemany("INSERT INTO amo_audit (line, start_offset, end_offset) VALUES (%s, %s, %s)",
                                          rows)
                await conn.execute("DELETE FROM amo_audit WHERE start_offset < %s", (offset - self.budget,))
        except psycopg.OperationalError as err:
            raise StateUnavailable(f"the shared audit trail is unreachable: {describe(err)}") from None

    async def tail(self, limit: int | None) -> list[str]:
        query = "SELECT line FROM (SELECT seq, line FROM amo_audit ORDER BY seq DESC LIMIT %s) t ORDER BY seq"
        try:
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(query, (limit,))).fetchall()
        except psycopg.OperationalError as err:
            raise StateUnavailable(f"the shared audit trail is unreachable: {describe(err)}") from None
        return [str(r[0]) for r in rows]


@contextlib.asynccontextmanager
async def standalone(url: str, rotation: Rotation | None = None) -> AsyncIterator[PgAudit]:
    """The trail for a command-line tool: a pool of its own (one connection), migrated, closed afterwards."""
    pool = await open_pool(url, max_size=1)
    try:
        await migrate(pool)
        yield PgAudit(pool, rotation)
    except psycopg.OperationalError as err:
        raise StateUnavailable(f"the shared audit trail is unreachable: {describe(err)}") from None
    finally:
        await pool.close()
