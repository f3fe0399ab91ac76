"""The async face of the vault: file work in threads, a cached snapshot for the hot path."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from amo_gateway.tokens import Account, VaultData
from amo_gateway.vault import Signature, Unchanged, Vault

T = TypeVar("T")


class Store:
    """Reads are served from memory until the file changes on disk (another process wrote it).

    Anything that decides on a refresh token re-reads under the lock via `update`, never the cache.
    """

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self._cache: VaultData | None = None
        self._signature: Signature = None

    async def snapshot(self) -> VaultData:
        """The current vault: the cache while the file's signature is unchanged, else a fresh read."""
        if self._cache is None or self.vault.signature() != self._signature:
            return await self.reload()
        return self._cache

    async def reload(self) -> VaultData:
        data, self._signature = await asyncio.to_thread(self.vault.read)
        self._cache = data
        return data

    async def update(self, change: Callable[[VaultData], T | Unchanged[T]]) -> T:
        """Locked read-modify-write in a thread; the saved data becomes the cache."""
        outcome: tuple[T, VaultData, Signature] = await asyncio.to_thread(self.vault.update, change)
        result, self._cache, self._signature = outcome
        return result

    async def account(self, account_id: str) -> Account | None:
        return (await self.snapshot()).accounts.get(account_id)
