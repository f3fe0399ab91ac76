"""One audit-trail contract, both backends: files beside the vault and PostgreSQL's `amo_audit` keep it alike.

Each test runs twice (`file`, `postgres`), with two sinks on the same trail (two processes on one vault
directory, two replicas on one database): lines come back in the order written, what one writes the other
reads, concurrent writers never interleave a batch, and the trail keeps AMO_AUDIT_MAX_BYTES * (backups + 1).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from amo_gateway.audit_file import AuditFile, Rotation
from amo_gateway.backends.base import AuditSink
from amo_gateway.backends.pg_audit import PgAudit
from amo_gateway.backends.pg_schema import migrate, open_pool

MakeSink = Callable[[Rotation], Awaitable[AuditSink]]


@pytest.fixture(params=["file", "postgres"])
async def make_sink(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeSink]:
    pools: list[Any] = []
    url = str(request.getfixturevalue("database_url")) if request.param == "postgres" else ""

    async def make(rotation: Rotation) -> AuditSink:
        if not url:
            return AuditFile(tmp_path / "audit.log", rotation)
        pool = await open_pool(url, max_size=2)
        pools.append(pool)
        await migrate(pool)
        return PgAudit(pool, rotation)

    yield make
    for pool in pools:
        await pool.close()


def _line(writer: str, n: int, pad: int = 40) -> str:
    return json.dumps({"ts": "2026-12-07T00:00:00.000Z", "event": "test", "w": writer, "n": n, "pad": "p" * pad},
                      separators=(",", ":"))


async def test_what_one_writes_the_other_reads_in_order(make_sink: MakeSink) -> None:
    one, two = await make_sink(Rotation()), await make_sink(Rotation())
    await one.append([_line("one", 0), _line("one", 1)])
    await two.append([_line("two", 0)])
    await one.append([_line("one", 2)])
    expected = [_line("one", 0), _line("one", 1), _line("two", 0), _line("one", 2)]
    assert await two.tail(None) == expected
    assert await one.tail(2) == expected[-2:]


async def test_concurrent_writers_keep_each_batch_whole_and_in_order(make_sink: MakeSink) -> None:
    """Two writers, 20 batches of 5 each at once: every batch is contiguous and each writer's batches in order."""
    sinks = [await make_sink(Rotation()), await make_sink(Rotation())]

    async def write(sink: AuditSink, name: str) -> None:
        for batch in range(20):
            await sink.append([_line(name, batch * 5 + i) for i in range(5)])

    await asyncio.gather(write(sinks[0], "a"), write(sinks[1], "b"))
    records = [json.loads(line) for line in await sinks[0].tail(None)]
    assert len(records) == 200
    for start in range(0, 200, 5):
        chunk = records[start:start + 5]
        assert len({r["w"] for r in chunk}) == 1 and [r["n"] % 5 for r in chunk] == [0, 1, 2, 3, 4]
    for name in "ab":
        assert [r["n"] for r in records if r["w"] == name] == list(range(100))


async def test_the_trail_keeps_max_bytes_times_backups_plus_one(make_sink: MakeSink) -> None:
    """1 000-byte budget per file, 2 backups: 200 lines of ~100 bytes keep at most 3 000 bytes, newest kept."""
    rotation = Rotation(max_bytes=1000, backups=2)
    one, two = await make_sink(rotation), await make_sink(rotation)
    for n in range(200):
        await (one if n % 2 else two).append([_line("x", n)])
    kept = await one.tail(None)
    assert sum(len(line) + 1 for line in kept) <= 3000
    numbers = [json.loads(line)["n"] for line in kept]
    assert numbers[-1] == 199 and numbers == list(range(numbers[0], 200))
    assert len(numbers) >= 15  # about two files' worth at least: retention drops old lines, not the trail


async def test_the_database_trail_refuses_to_change_a_line(database_url: str) -> None:
    """Append-only in the database too: an UPDATE of a written line is refused by the table itself."""
    pool = await open_pool(database_url, max_size=1)
    await migrate(pool)
    await PgAudit(pool).append([_line("x", 1)])
    with psycopg.connect(database_url) as conn, pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        conn.execute("UPDATE amo_audit SET line = 'forged'")
    assert await PgAudit(pool).tail(None) == [_line("x", 1)]
    await pool.close()
