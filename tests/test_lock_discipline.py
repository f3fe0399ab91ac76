"""The lock discipline behind "never send a refresh token twice" and "the vault is always whole", step by step.

Each test pins one rule with two vault objects or two processes, so that breaking the rule fails here at
once rather than in a long run by luck: an update re-reads the file under the lock; a claimer waiting for
another process's refresh decides from the locked re-read, never its cache; a save goes through a temp
file, fsync, rename and a directory fsync; bearer tokens are compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from amo_gateway import store as store_module
from amo_gateway.auth import Authenticator
from amo_gateway.errors import Unauthorized
from amo_gateway.tokens import Account, TokenPair, VaultData
from amo_gateway.typedefs import MANAGER
from amo_gateway.vault import KeyRing, Vault
from tests.conftest import ACCOUNT_ID, FakeClock, RigFactory

ACCOUNT = str(ACCOUNT_ID)
ROOT = Path(__file__).resolve().parent.parent


def _account(account_id: str, refresh: str = "r") -> Account:
    pair = TokenPair(access_token=f"a-{account_id}", refresh_token=refresh, expires_at=2e9, obtained_at=1e9)
    return Account(account_id=account_id, base_url="https://demo.amocrm.ru").with_pair(pair)


def _add(account_id: str) -> Any:
    return lambda data: data.accounts.__setitem__(account_id, _account(account_id))


def test_update_sees_a_write_by_another_vault_object(tmp_path: Path, keys: KeyRing) -> None:
    """Two Vault objects on one file: an update re-reads under the lock, so neither loses the other's change."""
    first, second = Vault(tmp_path / "v.enc", keys), Vault(tmp_path / "v.enc", keys)
    first.prepare()
    first.update(_add("1"))
    assert set(second.load().accounts) == {"1"}  # second now holds a parsed copy of the file
    first.update(_add("2"))
    second.update(_add("3"))  # must start from the file as it is now, not from its copy
    assert set(Vault(tmp_path / "v.enc", keys).load().accounts) == {"1", "2", "3"}


def test_update_sees_a_write_by_another_process(tmp_path: Path, keys: KeyRing) -> None:
    """The same across processes: a change made by another process between two of ours survives."""
    path = tmp_path / "v.enc"
    key_file = tmp_path / "key"
    key_file.write_text("\n".join(keys.keys))
    ours = Vault(path, keys)
    ours.prepare()
    ours.update(_add("1"))
    other = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from amo_gateway.vault import KeyRing, Vault
        from tests.test_lock_discipline import _add
        Vault(Path({str(path)!r}), KeyRing.parse(Path({str(key_file)!r}).read_text())).update(_add("2"))
    """)
    subprocess.run([sys.executable, "-c", other], check=True, timeout=30)
    ours.update(_add("3"))
    assert set(Vault(path, keys).load().accounts) == {"1", "2", "3"}


def test_save_writes_a_new_file_fsyncs_it_renames_it_and_fsyncs_the_directory(
        tmp_path: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch) -> None:
    """Atomic and durable, in that order: never written in place, nothing renamed before it is on disk."""
    vault = Vault(tmp_path / "v.enc", keys)
    vault.prepare()
    vault.update(_add("1"))
    inode_before = os.stat(vault.path).st_ino
    steps: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "vault" if info.st_ino == os.stat(vault.path).st_ino \
            else "temp"
        steps.append(("fsync", kind))
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        steps.append(("replace", "temp->vault" if Path(dst) == vault.path and Path(src) != vault.path else "other"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", rename)
    vault.update(_add("2"))
    assert steps == [("fsync", "temp"), ("replace", "temp->vault"), ("fsync", "dir")]
    assert os.stat(vault.path).st_ino != inode_before  # a new file took the old one's place
    assert set(Vault(vault.path, keys).load().accounts) == {"1", "2"}


def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path, keys: KeyRing,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies before its rename (here: fsync fails) leaves the previous vault as it was."""
    vault = Vault(tmp_path / "v.enc", keys)
    vault.prepare()
    vault.update(_add("1"))
    before = vault.path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        vault.update(_add("2"))
    monkeypatch.undo()
    assert vault.path.read_bytes() == before
    assert set(Vault(vault.path, keys).load().accounts) == {"1"}
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_bearer_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bearer check goes through hmac.compare_digest (no early exit on the first differing byte)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    auth = Authenticator("operator-secret", {"crm": "consumer-secret"})
    request = make_mocked_request("GET", "/token", headers={"Authorization": "Bearer consumer-secret"})
    assert auth.consumer_or_operator(request) == "crm"
    assert (b"consumer-secret", b"consumer-secret") in calls
    calls.clear()
    wrong = make_mocked_request("GET", "/token", headers={"Authorization": "Bearer operator-secreT"})
    with pytest.raises(Unauthorized):
        auth.operator(wrong)
    assert calls == [(b"operator-secreT", b"operator-secret")]


async def _expire_stored_pair(vault: Vault) -> None:
    """Move the stored access token's expiry into the past: every process now judges the pair due."""

    def change(data: VaultData) -> None:
        account = data.accounts[ACCOUNT]
        assert account.tokens is not None
        data.accounts[ACCOUNT] = replace(account, tokens=replace(account.tokens, expires_at=time.time() - 60))

    await asyncio.to_thread(vault.update, change)


async def _wait_for_file(path: Path, proc: asyncio.subprocess.Process, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not await asyncio.to_thread(path.exists):  # the other process signals through the file system
        if proc.returncode is not None or time.monotonic() > deadline:
            out = await proc.stdout.read() if proc.stdout else b""
            raise AssertionError(f"the other process never got its answer: {out.decode()[-2000:]}")
        await asyncio.sleep(0.01)


async def test_a_claimer_waiting_on_another_process_never_resends_its_spent_token(
        make_rig: RigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Process A holds amoCRM's answer unstored; B, with the old pair in its cache, waits and then skips.

    B's cache is held fresh for the whole test (the worst case of its 50 ms window), so only a claim that
    re-reads the vault under the lock can see that A already spent the token.
    """
    rig = await make_rig(run_refresher=False)
    await rig.connect()
    vault = rig.vault()
    await _expire_stored_pair(vault)
    manager = rig.app[MANAGER]
    monkeypatch.setattr(store_module, "RECHECK", 3600.0)
    cached = await manager.store.snapshot(recheck=True)
    old_refresh = cached.accounts[ACCOUNT].tokens.refresh_token  # type: ignore[union-attr]
    pause = tmp_path / "pause"
    pause.mkdir()
    config = {"vault_path": str(rig.settings.vault_path), "keys": "\n".join(rig.keys.keys), "account_id": ACCOUNT,
              "client_id": rig.settings.client_id, "margin": 60, "pause_dir": str(pause),
              "redirect_uri": rig.settings.redirect_uri,
              "client_secret": rig.settings.client_secret.get_secret_value()}  # type: ignore[union-attr]
    proc = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "tests" / "claimer_proc.py"),
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(config).encode() + b"\n")  # secrets on a pipe, not in the argument list
    proc.stdin.close()
    try:
        await _wait_for_file(pause / "answered", proc)
        assert rig.sandbox.refresh_account(old_refresh) is None  # A's refresh spent the old token
        waiting = asyncio.create_task(manager.access(ACCOUNT))
        await asyncio.sleep(0.4)
        assert not waiting.done(), "B went ahead while A held the account's refresh lock"
        (pause / "go").touch()
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert json.loads(out.decode().splitlines()[-1])["result"] == "refreshed"
    pair = await asyncio.wait_for(waiting, 10)
    stored = vault.load().accounts[ACCOUNT].tokens
    assert stored is not None and pair.access_token == stored.access_token
    assert rig.sandbox.refresh_attempts == 1
    assert rig.sandbox.refresh_tokens_reused == 0
    assert stored.refresh_token == rig.sandbox.live_refresh_token(ACCOUNT_ID)


async def test_refresher_replans_when_another_process_changes_the_vault(make_rig: RigFactory) -> None:
    """A refresher asleep until a far due time wakes within about a second when the file changes under it."""
    clock = FakeClock(start=time.time())
    rig = await make_rig(clock=clock, refresh_margin=600, sandbox_access_ttl=3600)
    await rig.connect()
    await asyncio.sleep(0.3)  # the refresher has planned: nothing due for 50 minutes of a clock that stands still
    assert rig.sandbox.refresh_attempts == 0
    await _expire_stored_pair(rig.vault())  # as another process would leave it
    for _ in range(60):
        if rig.sandbox.refresh_attempts:
            break
        await asyncio.sleep(0.05)
    assert rig.sandbox.refresh_attempts == 1


async def test_the_new_pair_is_stored_while_the_refresh_lock_is_still_held(
        make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Single flight ends only after the store: whoever takes the lock next sees the new pair, never the spent one.

    Checked at the moment the outcome is stored, for both entries (a waiting refresh and the scheduler's batch):
    taking the account's lock must fail then.
    """
    rig = await make_rig(run_refresher=False)
    await rig.connect()
    manager = rig.app[MANAGER]
    real = manager.store.store_outcomes
    held: list[bool] = []

    async def storing(outcomes: Any, now: float) -> Any:
        free = await manager.locks.try_hold(ACCOUNT)
        if free:
            await manager.locks.release(ACCOUNT)
        held.append(not free)
        return await real(outcomes, now)

    monkeypatch.setattr(manager.store, "store_outcomes", storing)
    await _expire_stored_pair(rig.vault())
    assert (await manager.refresh(ACCOUNT)).result == "refreshed"
    await _expire_stored_pair(rig.vault())
    assert [o.result for o in await manager.refresh_due([ACCOUNT])] == ["refreshed"]
    assert held == [True, True]
