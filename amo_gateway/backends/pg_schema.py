"""PostgreSQL plumbing: the connection pool, versioned migrations under an advisory lock, sealed rows.

Migrations are the numbered files in amo_gateway/migrations (`0001_state.sql`, …), applied in order at
start-up, each in its own transaction, under a transaction-level advisory lock: two replicas starting
together apply each file once, the second waits and finds it done.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

import psycopg
from cryptography.fernet import InvalidToken
from psycopg_pool import AsyncConnectionPool

from amo_gateway.errors import StateUnavailable, VaultUndecryptable
from amo_gateway.vault import KeyRing

MIGRATION_LOCK = 0x616D6F67617465  # "amogate": the advisory lock key every replica's migrator takes
_MIGRATION = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
Pool = AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]]


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every shipped migration, in order."""
    folder = resources.files("amo_gateway") / "migrations"
    found = [(int(m.group(1)), entry.name) for entry in folder.iterdir() if (m := _MIGRATION.match(entry.name))]
    return [(version, name, (folder / name).read_text(encoding="utf-8")) for version, name in sorted(found)]


async def migrate(pool: Pool) -> list[str]:
    """Apply the migrations this database lacks; returns the file names applied now."""
    applied: list[str] = []
    for version, name, sql in migrations():
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute("CREATE TABLE IF NOT EXISTS amo_schema_migrations (version int PRIMARY KEY, "
                               "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT clock_timestamp())")
            done = await (await conn.execute("SELECT 1 FROM amo_schema_migrations WHERE version = %s",
                                             (version,))).fetchone()
            if done is None:
                await conn.execute(sql.encode())  # no parameters: the file's statements run as one script
                await conn.execute("INSERT INTO amo_schema_migrations (version, name) VALUES (%s, %s)",
                                   (version, name))
                applied.append(name)
    return applied


async def open_pool(url: str, *, max_size: int = 10, wait: float = 10.0) -> Pool:
    """A pool whose connections are checked before use (a database restart costs one failed check, not a 500)."""
    pool: Pool = AsyncConnectionPool(url, min_size=1, max_size=max_size, open=False, timeout=wait,
                                     check=AsyncConnectionPool.check_connection, name="amo-gateway",
                                     reconnect_timeout=60.0)
    try:
        await pool.open(wait=True, timeout=wait)
    except psycopg.Error as err:
        await pool.close()
        raise StateUnavailable(f"cannot reach the PostgreSQL database of AMO_DATABASE_URL: {describe(err)}") from None
    return pool


def describe(err: BaseException) -> str:
    """A driver error as one line, without the connection string (it may carry a password)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"postgres(ql)?://\S+", "postgresql://…", text)[:300]


def key_fp(key: str) -> str:
    """A one-way name of a vault key, kept beside each row it sealed (not enough to find the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Sealer:
    """Seals rows under the vault key ring; a row sealed by a key this ring lacks reloads the ring once."""

    def __init__(self, keys: KeyRing, key_source: Callable[[], KeyRing] | None) -> None:
        self._key_source = key_source
        self.keys = keys

    @property
    def keys(self) -> KeyRing:
        return self._keys

    @keys.setter
    def keys(self, keys: KeyRing) -> None:
        self._keys = keys
        self._fps = [key_fp(k) for k in keys.keys]  # once per ring, not once per row

    @property
    def primary_fp(self) -> str:
        return self._fps[0]

    def seal(self, raw: dict[str, Any]) -> tuple[bytes, str]:
        """(Fernet token of the JSON, fingerprint of the key that sealed it)."""
        return self.keys.encrypt(json.dumps(raw, separators=(",", ":")).encode()), self.primary_fp

    def open(self, sealed: bytes, fp: str) -> dict[str, Any]:
        """The row's JSON; after `rotate-key` wrote a new key file, the first row under the new key reloads it."""
        if fp not in self._fps and self._key_source is not None:
            fresh = self._key_source()
            if fresh.keys:
                self.keys = fresh
        try:
            value: dict[str, Any] = json.loads(self.keys.decrypt(bytes(sealed)))
        except InvalidToken:
            raise VaultUndecryptable("a row of the shared state does not decrypt with the configured vault keys "
                                     "(wrong key, or a key dropped too early); it was left untouched") from None
        return value
