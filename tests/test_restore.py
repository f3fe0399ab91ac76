"""Restoring a vault backup (amo_gateway/restore.py, `amo-gateway restore`): a spent token is found out at once."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from amo_gateway.restore import mark_for_verification
from amo_gateway.tokens import CONNECTED, REAUTH_REQUIRED
from amo_gateway.typedefs import MANAGER
from tests.conftest import ACCOUNT_ID, Rig, RigFactory

ACCOUNT = str(ACCOUNT_ID)


def _restore(rig: Rig, backup: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    key_file = tmp_path / "vault-key"
    key_file.write_text("\n".join(rig.keys.keys) + "\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AMO_")},
           "AMO_VAULT_PATH": str(rig.settings.vault_path), "AMO_VAULT_KEY_FILE": str(key_file)}
    return subprocess.run([sys.executable, "-m", "amo_gateway", "restore", str(backup)], env=env,
                          capture_output=True, text=True, timeout=30, check=False)


async def test_a_restored_backup_with_a_spent_token_says_reauth_required_within_seconds(
        make_rig: RigFactory, tmp_path: Path) -> None:
    """Backup, a refresh (amoCRM spends the backup's token), restore: the running service says so at once."""
    rig = await make_rig()
    await rig.connect()
    backup = tmp_path / "vault.backup"
    shutil.copy(rig.settings.vault_path, backup)
    await asyncio.to_thread(rig.vault().update, lambda data: mark_for_verification(data, time.time()))
    await rig.app[MANAGER].refresh(ACCOUNT)  # due now: the pair in the backup is spent at amoCRM
    attempts = rig.sandbox.refresh_attempts
    assert attempts == 1
    done = _restore(rig, backup, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "verified with amoCRM at once" in done.stdout
    for _ in range(160):
        account = rig.vault().load().accounts[ACCOUNT]
        if account.status == REAUTH_REQUIRED:
            break
        await asyncio.sleep(0.05)
    assert account.status == REAUTH_REQUIRED and (account.reason or "").startswith("token_revoked"), account.reason
    assert rig.sandbox.refresh_attempts == attempts + 1  # one verification, no retry storm
    resp = await rig.client.get("/readyz")
    assert resp.status == 503


async def test_a_restored_backup_with_a_live_token_is_refreshed_and_stays_connected(
        make_rig: RigFactory, tmp_path: Path) -> None:
    """A backup whose token amoCRM still accepts: verified by one refresh, connected, the new pair stored."""
    rig = await make_rig()
    await rig.connect()
    backup = tmp_path / "vault.backup"
    shutil.copy(rig.settings.vault_path, backup)
    done = _restore(rig, backup, tmp_path)
    assert done.returncode == 0, done.stderr
    for _ in range(160):
        if rig.sandbox.refresh_attempts:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    account = rig.vault().load().accounts[ACCOUNT]
    assert rig.sandbox.refresh_attempts == 1
    assert account.status == CONNECTED and account.last_error is None
    assert account.tokens is not None and account.tokens.refresh_token == rig.sandbox.live_refresh_token(ACCOUNT_ID)
