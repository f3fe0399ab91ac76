"""The async face of the vault: file work in threads, a cached snapshot for the hot path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from amo_gateway.errors import VaultUndecryptable
from amo_gateway.tokens import Account, VaultData
from amo_gateway.vault import KeyRing, Signature, Unchanged, Vault

T = TypeVar("T")
RECHECK = 0.05  # seconds between stats of the vault file on the read path


class Store:
    """Reads are served from memory until the file changes on disk (another process wrote it).

    Anything that decides on a refresh token re-reads under the lock via `update`, never the cache.
    """

    def __init__(self, vault: Vault, key_source: Callable[[], KeyRing] | None = None) -> None:
        self.vault = vault
        self._key_source = key_source
        self._cache: VaultData | None = None
        self._signature: Signature = None
        self._checked_at = float("-inf")

    async def snapshot(self, *, recheck: bool = False) -> VaultData:
        """The current vault: the cache while the file's signature is unchanged, else a fresh read.

        The file is stat'ed at most every RECHECK seconds (always with `recheck`, as probes want): another
        process's write shows up within that time, and what the hot path reads meanwhile (an access token)
        stays valid until it expires.
        """
        now = time.monotonic()
        if self._cache is not None and not recheck and now - self._checked_at < RECHECK:
            return self._cache
        self._checked_at = now
        if self._cache is None or self.vault.signature() != self._signature:
            return await self.reload()
        return self._cache

    async def reload(self) -> VaultData:
        data, self._signature = await self._run(self.vault.read)
        self._cache = data
        return data

    async def update(self, change: Callable[[VaultData], T | Unchanged[T]], *, claim: bool = False,
                     spend_reserve: bool = False) -> T:
        """Locked read-modify-write in a thread; the saved data becomes the cache (flags: see Vault.update)."""
        outcome: tuple[T, VaultData, Signature] = await self._run(
            lambda: self.vault.update(change, claim=claim, spend_reserve=spend_reserve))
        result, self._cache, self._signature = outcome
        return result

    async def _run(self, work: Callable[[], T]) -> T:
        """File work in a thread; after `rotate-key` rewrote the key file, pick up the new keys once and retry."""
        try:
            return await asyncio.to_thread(work)
        except VaultUndecryptable:
            fresh = self._key_source() if self._key_source else None
            if fresh is None or fresh.keys == self.vault.keys.keys:
                raise
            self.vault.keys = fresh
            return await asyncio.to_thread(work)

    async def account(self, account_id: str) -> Account | None:
        return (await self.snapshot()).accounts.get(account_id)
