"""Operator tools across backends: move the shared state between the vault file and PostgreSQL, re-seal rows.

`migrate-state` copies everything (accounts with their pairs and in-flight markers, pending states, exchange
slots) and deletes nothing: a record the target already has under the same key is replaced by the source's,
every other record of the target stays. Run twice, it changes nothing more. Both directions hold the vault
file's lock while they touch the file, so a gateway on that file cannot write in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from amo_gateway.errors import ConfigError
from amo_gateway.tokens import VaultData
from amo_gateway.vault import KeyRing, Vault

if TYPE_CHECKING:
    from amo_gateway.backends.postgres import PgStore

T = TypeVar("T")
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def migrate_state(source_vault: Path, database_url: str | None, keys: KeyRing, target: str) -> str:
    """Copy the state to `target` (postgresql://… or file:PATH); returns what was copied, for the operator."""
    if target.startswith(POSTGRES_SCHEMES):
        return _file_to_database(source_vault, keys, target)
    if target.startswith("file:") and len(target) > len("file:"):
        if not database_url:
            raise ConfigError("migrate-state --to file:PATH copies from the database: set AMO_DATABASE_URL")
        return _database_to_file(database_url, keys, Path(target[len("file:"):]))
    raise ConfigError("--to takes postgresql://user@host:port/database or file:PATH")


def _file_to_database(path: Path, keys: KeyRing, url: str) -> str:
    vault = Vault(path, keys)
    vault.prepare()
    with vault.locked():  # nothing writes the file while it is copied
        data = vault.load()
        asyncio.run(_import(url, keys, data))
    return f"copied {_counts(data)} from {path} into the database (nothing was deleted from either)"


def _database_to_file(url: str, keys: KeyRing, path: Path) -> str:
    data = asyncio.run(_export(url, keys))
    vault = Vault(path, keys)
    vault.prepare()
    vault.update(lambda target: _merge(target, data))  # under the file lock, atomically
    return f"copied {_counts(data)} from the database into {path} (nothing was deleted from either)"


def _merge(target: VaultData, source: VaultData) -> None:
    target.accounts.update(source.accounts)
    target.states.update(source.states)
    target.exchange_slots.update(source.exchange_slots)


def _counts(data: VaultData) -> str:
    return (f"{len(data.accounts)} account(s), {len(data.states)} pending state(s), "
            f"{len(data.exchange_slots)} exchange slot(s)")


async def _import(url: str, keys: KeyRing, data: VaultData) -> None:
    from amo_gateway.backends.postgres import opened

    async with opened(url, keys) as store:
        await store.import_all(data)


async def _export(url: str, keys: KeyRing) -> VaultData:
    from amo_gateway.backends.postgres import opened

    async with opened(url, keys) as store:
        return await store.export_all()


def reseal_database(url: str, keys: KeyRing) -> int:
    """Re-encrypt every row under `keys`' primary, in batches, while the service runs; returns how many."""
    async def run() -> int:
        from amo_gateway.backends.postgres import opened

        async with opened(url, keys) as store:
            return await store.reseal()

    return asyncio.run(run())


def export_database(url: str, keys: KeyRing) -> VaultData:
    """Everything the database holds, decrypted (`status`, `forget`)."""
    return asyncio.run(_export(url, keys))


def forget_in_database(url: str, keys: KeyRing, account_id: str) -> bool:
    """Remove one account in one transaction; the replicas hear of it (NOTIFY) and stop refreshing it."""
    async def run() -> bool:
        from amo_gateway.backends.postgres import opened

        async with opened(url, keys) as store:
            return await store.forget(account_id)

    return asyncio.run(run())


def on_database(url: str, keys: KeyRing, work: Callable[[PgStore], Awaitable[T]]) -> T:
    """Run one operator tool's work on the database's state (`authorize-url`, `import-token`): opened, closed after;
    every replica hears of what it changed."""
    async def run() -> T:
        from amo_gateway.backends.postgres import opened

        async with opened(url, keys) as store:
            return await work(store)

    return asyncio.run(run())


def restore_in_database(url: str, keys: KeyRing, restored: VaultData) -> None:
    """`restore`: the backup's accounts in place of the database's (states and slots stay, as in the file).

    Two steps, not one transaction: the backup's accounts are upserted (their one notification wakes every
    replica's refresher, which verifies them at once), then the accounts the backup lacks are forgotten.
    """
    async def work(store: PgStore) -> None:
        current = await store.export_all()
        await store.import_all(VaultData(accounts=dict(restored.accounts)))
        for account_id in [a for a in current.accounts if a not in restored.accounts]:
            await store.forget(account_id)

    on_database(url, keys, work)
