"""The async face of the vault: file work in threads, a cached snapshot for the hot path."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from amo_gateway.backends.base import Claim
from amo_gateway.errors import VaultUndecryptable
from amo_gateway.flows import _add_state, _forget, _pop_state, _release, _reserve
from amo_gateway.idempotency import IdempotencyStore, LocalAnswers
from amo_gateway.locks import RefreshLocks
from amo_gateway.manager import _apply, _claim
from amo_gateway.ratelimit import Limiters
from amo_gateway.tokens import Account, PendingState, VaultData
from amo_gateway.vault import KeyRing, Signature, Unchanged, Vault

if TYPE_CHECKING:
    from amo_gateway.manager import Outcome

T = TypeVar("T")
RECHECK = 0.05  # seconds between stats of the vault file on the read path


class Store:
    """The file backend of StateStore (backends/base.py): the vault file shared by the processes of one machine.

    Reads are served from memory until the file changes on disk (another process wrote it). Anything that
    decides on a refresh token re-reads under the lock via `update`, never the cache: each StateStore
    operation is one of the pure change functions run by `update` under the file lock.
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

    # --- StateStore: each operation is today's pure change function under the file lock ---

    @property
    def keys(self) -> KeyRing:
        return self.vault.keys

    @property
    def where(self) -> str:
        return str(self.vault.path)

    async def open(self) -> None:
        """Create the 0700 directory (refusing symlinks, sweeping dead writers' temp files), then read once."""
        await asyncio.to_thread(self.vault.prepare)
        with contextlib.suppress(OSError):  # made early, while there is room; every claim insists on it
            await asyncio.to_thread(self.vault.reserve.ensure)  # (headroom.py); the CLI, maybe root, never makes it
        await self.reload()

    async def close(self) -> None:
        """Nothing held open between operations: every one opens, locks and closes the file."""

    async def claim(self, account_ids: Sequence[str], now: float, margin: float, seen: str | None, *,
                    skip_locked: bool) -> list[Claim]:
        """`skip_locked` needs nothing here: the refresh locks already kept other claimers out."""
        ids = list(account_ids)
        return await self.update(lambda data: _claim(data, ids, now, margin, seen), claim=True)

    async def store_outcomes(self, outcomes: Sequence[Outcome], now: float) -> dict[str, Account]:
        """May spend the disk reserve: the answers exist nowhere else."""
        return await self.update(lambda data: _apply(data, list(outcomes), now), spend_reserve=True)

    async def put_account(self, account: Account) -> None:
        """May spend the disk reserve: the code that bought the pair is spent."""
        await self.update(lambda data: data.accounts.__setitem__(account.account_id, account), spend_reserve=True)

    async def forget(self, account_id: str) -> bool:
        return await self.update(lambda data: _forget(data, account_id))

    async def reserve_exchange(self, slot: str, now: float, until: float, state_key: str,
                               pending: PendingState) -> None:
        await self.update(lambda data: _reserve(data, slot, now, until, state_key, pending))

    async def release_exchange(self, slot: str, state_key: str) -> None:
        await self.update(lambda data: _release(data, slot, state_key))

    async def add_state(self, key: str, pending: PendingState, now: float) -> None:
        await self.update(lambda data: _add_state(data, key, pending, now))

    async def peek_state(self, key: str) -> PendingState | None:
        """From the cached view; on a miss (issued by another process a moment ago?) only a changed file is read
        again, so misses stay cheap."""
        found = (await self.snapshot()).states.get(key)
        return found if found is not None else (await self.snapshot(recheck=True)).states.get(key)

    async def pop_state(self, key: str) -> PendingState | None:
        return await self.update(lambda data: _pop_state(data, key))

    async def wait_for_change(self, poll: float) -> None:
        """Return once the vault file differs from what it was (a stat every `poll` s, in real time).

        Processes sharing a vault learn of each other's connects and refreshes only through the file.
        """
        # The file as of the data last read, not as of now: a write that lands between the refresher's plan
        # and this call must wake it too (found by a restore landing in that gap: the refresher slept on).
        seen = self._signature if self._cache is not None else self.vault.signature()
        while self.vault.signature() == seen:  # noqa: ASYNC110 - the change happens in another process: no Event
            await asyncio.sleep(poll)

    def refresh_locks(self) -> RefreshLocks:
        """fcntl record locks in `<vault>.refresh.lock`, beside the vault every process shares."""
        return RefreshLocks(self.vault.path.with_name(self.vault.path.name + ".refresh.lock"))

    def limiters(self, limit: int, queue: int, *, window: float) -> Limiters:
        """In-process limiters: the file backend is one gateway process per machine."""
        return Limiters(limit, queue, window=window)

    def degraded(self) -> str | None:
        """Never: a file that cannot be read fails the read itself."""
        return None

    def answers(self, window: float, max_bytes: int, *, on_evict: Callable[[], None] | None = None) -> LocalAnswers:
        """In-process answers under a byte cap, as before: one gateway process per machine."""
        return LocalAnswers(IdempotencyStore(window, max_bytes, on_evict=on_evict))
