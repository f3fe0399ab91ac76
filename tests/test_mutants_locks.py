"""Refresh locks against another real process (locks.py): POSIX record locks only exclude across processes.

A helper process takes the account's byte in `<vault>.refresh.lock` with plain fcntl, exactly as another
gateway (of this or any other version) would; the tests then look at what this process may take.
"""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from amo_gateway.locks import RefreshLocks, _offset

HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
for offset in sys.argv[2:]:
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, int(offset))
print("held", flush=True)
sys.stdin.read()
"""
PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, int(sys.argv[2]))
except OSError:
    print("busy")
else:
    print("free")
"""
ACCOUNT = "31920194"


@contextmanager
def other_process_holding(path: Path, *offsets: int) -> Iterator[subprocess.Popen[str]]:
    """Another process holds these bytes until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), *map(str, offsets)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        assert holder.stdout is not None
        holder.stdout.close()


async def seen_from_another_process(path: Path, offset: int) -> str:
    """'busy' when some other process holds the byte, else 'free'."""
    probe = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", PROBE, str(path), str(offset)],
                                    capture_output=True, text=True, check=True, timeout=10)
    return probe.stdout.strip()


@pytest.fixture
async def locks(tmp_path: Path) -> AsyncIterator[RefreshLocks]:
    refresh_locks = RefreshLocks(tmp_path / "vault.enc.refresh.lock")
    yield refresh_locks
    refresh_locks.close()


def test_account_lock_byte_is_fixed_across_versions() -> None:
    """A numeric id is its own offset, anything else (or a 15+ digit id) its crc32: every process agrees."""
    assert _offset(ACCOUNT) == 31920194
    assert _offset("acme") == zlib.crc32(b"acme")
    assert _offset("1" * 14) == 11111111111111
    assert _offset("1" * 15) == zlib.crc32(b"1" * 15)


async def test_account_held_by_another_process_is_not_taken(tmp_path: Path, locks: RefreshLocks) -> None:
    """try_hold says False while another process refreshes the account; hold waits until it lets go."""
    path = tmp_path / "vault.enc.refresh.lock"
    with other_process_holding(path, int(ACCOUNT)):
        assert await locks.try_hold(ACCOUNT) is False
        held = locks.hold(ACCOUNT)
        waiter = asyncio.ensure_future(held.__aenter__())
        await asyncio.sleep(0.2)
        assert not waiter.done()
    await asyncio.wait_for(waiter, 5)
    assert await seen_from_another_process(path, int(ACCOUNT)) == "busy"
    await held.__aexit__(None, None, None)
    assert await locks.try_hold(ACCOUNT) is True  # the failed try_hold gave its asyncio lock back
    await locks.release(ACCOUNT)


async def test_accounts_lock_independently(tmp_path: Path, locks: RefreshLocks) -> None:
    """Another process refreshing the neighbouring account does not block this one."""
    with other_process_holding(tmp_path / "vault.enc.refresh.lock", int(ACCOUNT) + 1):
        assert await locks.try_hold(ACCOUNT) is True
        await locks.release(ACCOUNT)


async def test_release_frees_exactly_its_own_account(tmp_path: Path, locks: RefreshLocks) -> None:
    """After release another process can take the account, while a neighbour held here stays held."""
    path = tmp_path / "vault.enc.refresh.lock"
    neighbour = str(int(ACCOUNT) + 1)
    assert await locks.try_hold(ACCOUNT) and await locks.try_hold(neighbour)
    assert await seen_from_another_process(path, int(ACCOUNT)) == "busy"
    await locks.release(ACCOUNT)
    assert await seen_from_another_process(path, int(ACCOUNT)) == "free"
    assert await seen_from_another_process(path, int(neighbour)) == "busy"
    await locks.release(neighbour)


def test_lock_file_is_private(tmp_path: Path) -> None:
    """The refresh lock file is created 0600, like everything else beside the vault."""
    path = tmp_path / "vault.enc.refresh.lock"
    RefreshLocks(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
