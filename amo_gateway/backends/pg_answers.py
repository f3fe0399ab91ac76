"""Idempotency-Key answers shared by every replica: a retry that reaches another replica is replayed too.

Same rules as the in-memory IdempotencyStore (one request per key per consumer within the window; a second
one while the first is in flight, or after it got no answer, is a 409), kept in `amo_idempotency`. The key is
reserved by an INSERT that only one replica can win. Answers are sealed with the vault key ring (they are
customer data) and capped per answer (MAX_REMEMBERED_BODY, as in memory); instead of a total byte cap in
memory, rows leave the table when their window has passed.
"""

from __future__ import annotations

import base64
from typing import Any

import psycopg

from amo_gateway.backends.pg_schema import Pool, Sealer, describe
from amo_gateway.errors import BadRequest, StateUnavailable, VaultUndecryptable
from amo_gateway.idempotency import MAX_KEY_LENGTH, Headers, Remembered, replayable

_RESERVE = """
WITH gone AS (DELETE FROM amo_idempotency WHERE expires_at <= clock_timestamp())
INSERT INTO amo_idempotency (consumer, key, request_fp, expires_at)
VALUES (%s, %s, %s, clock_timestamp() + make_interval(secs => %s))
ON CONFLICT (consumer, key) DO NOTHING
RETURNING 1
"""
_FOUND = """
SELECT request_fp, status, sealed, key_fp, outcome_unknown FROM amo_idempotency
WHERE consumer = %s AND key = %s AND expires_at > clock_timestamp()
"""


class SharedAnswers:
    """The proxy's remembered answers in PostgreSQL."""

    def __init__(self, pool: Pool, sealer: Sealer, window: float) -> None:
        self._pool = pool
        self._sealer = sealer
        self._window = window

    @property
    def size(self) -> int:
        return 0  # nothing held in this process

    async def begin(self, consumer: str, key: str, request_fp: str) -> Remembered | None:
        if not key or len(key) > MAX_KEY_LENGTH:
            raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters", code="bad_idempotency_key")
        while True:  # the row seen as taken may expire between the two statements: then reserve again
            if await self._run(_RESERVE, (consumer, key, request_fp, self._window), fetch=True):
                return None
            rows = await self._run(_FOUND, (consumer, key), fetch=True)
            if rows:
                return replayable(self._remembered(rows[0]), request_fp)

    async def finish(self, consumer: str, key: str, status: int, headers: Headers, body: bytes | None) -> None:
        sealed, fp = self._sealer.seal({"headers": [list(h) for h in headers],
                                        "body": base64.b64encode(body).decode() if body is not None else None})
        await self._run("UPDATE amo_idempotency SET status = %s, sealed = %s, key_fp = %s "
                        "WHERE consumer = %s AND key = %s", (status, sealed, fp, consumer, key))

    async def unknown(self, consumer: str, key: str) -> None:
        await self._run("UPDATE amo_idempotency SET outcome_unknown = true WHERE consumer = %s AND key = %s",
                        (consumer, key))

    async def forget(self, consumer: str, key: str) -> None:
        await self._run("DELETE FROM amo_idempotency WHERE consumer = %s AND key = %s", (consumer, key))

    def _remembered(self, row: tuple[Any, ...]) -> Remembered:
        found = Remembered(request_fp=row[0], expires_at=0.0, status=row[1], outcome_unknown=row[4])
        if row[2] is not None:
            try:
                answer = self._sealer.open(row[2], row[3])
            except VaultUndecryptable:  # sealed by a key rotate-key --drop-old retired: it cannot be replayed
                found.evicted = True
                return found
            found.headers = tuple((str(k), str(v)) for k, v in answer["headers"])
            found.body = base64.b64decode(answer["body"]) if answer["body"] is not None else None
        return found

    async def _run(self, query: str, params: tuple[Any, ...], *, fetch: bool = False) -> list[tuple[Any, ...]]:
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(query, params)
                return await cur.fetchall() if fetch else []
        except psycopg.OperationalError as err:
            raise StateUnavailable(f"the shared Idempotency-Key answers are unreachable: {describe(err)}") from None
