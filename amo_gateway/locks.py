"""Per-account refresh locks that hold across coroutines (asyncio.Lock) and processes (fcntl record locks).

Every process sharing a vault takes a one-byte POSIX record lock at an offset derived from the account id
in `<vault>.refresh.lock`. Record locks belong to the process, so the file is opened once and kept open
(closing any descriptor of it would drop every lock); coroutines of one process exclude each other with
the asyncio lock taken first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from amo_gateway.vault import open_no_follow

_POLL = 0.02


class RefreshLocks:
    """Single-flight refresh per account, across coroutines and processes."""

    def __init__(self, path: Path) -> None:
        self._fd = open_no_follow(path, os.O_RDWR | os.O_CREAT)
        self._locks: dict[str, asyncio.Lock] = {}

    def close(self) -> None:
        os.close(self._fd)

    @contextlib.asynccontextmanager
    async def hold(self, account_id: str) -> AsyncIterator[None]:
        """Wait for the account's lock in this process, then across processes."""
        async with self._local(account_id):
            while not self._try_os_lock(account_id):  # noqa: ASYNC110 - another process holds it; no Event can tell us
                await asyncio.sleep(_POLL)
            try:
                yield
            finally:
                self._os_unlock(account_id)

    async def try_hold(self, account_id: str) -> bool:
        """Take the lock without waiting; False when any coroutine or process holds it. Pair with release()."""
        local = self._local(account_id)
        if local.locked():
            return False
        await local.acquire()  # uncontended: returns without suspending
        if self._try_os_lock(account_id):
            return True
        local.release()
        return False

    async def release(self, account_id: str) -> None:
        self._os_unlock(account_id)
        self._local(account_id).release()

    async def try_hold_many(self, account_ids: Sequence[str]) -> list[str]:
        return [a for a in account_ids if await self.try_hold(a)]

    async def release_many(self, account_ids: Sequence[str]) -> None:
        for account_id in account_ids:
            await self.release(account_id)

    def _local(self, account_id: str) -> asyncio.Lock:
        return self._locks.setdefault(account_id, asyncio.Lock())

    def _try_os_lock(self, account_id: str) -> bool:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _offset(account_id))
        except (BlockingIOError, PermissionError):
            return False
        return True

    def _os_unlock(self, account_id: str) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _offset(account_id))


def _offset(account_id: str) -> int:
    """A stable byte offset for the account (ids are numbers; anything else is hashed)."""
    return int(account_id) if account_id.isdigit() and len(account_id) < 15 else zlib.crc32(account_id.encode())
