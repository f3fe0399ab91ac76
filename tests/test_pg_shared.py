"""What else replicas on one database share: the 401 refresh budget, and the CLI tools that write state."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from amo_gateway.backends.pg_budget import SharedRefreshBudget
from amo_gateway.backends.pg_schema import migrate, open_pool
from amo_gateway.tokens import REAUTH_REQUIRED, VaultData
from amo_gateway.typedefs import AUDIT, MANAGER, STORE
from amo_gateway.vault import Vault
from tests.conftest import ACCOUNT_ID, RigFactory
from tests.pg import PgVaultView
from tests.test_accounts import _jwt
from tests.test_pg_gateway import _second_gateway
from tests.test_proxy_hardening import CONSUMER, DENIED

ACCOUNT = str(ACCOUNT_ID)


async def test_the_401_refresh_budget_is_taken_once_by_all_replicas(database_url: str) -> None:
    """Two replicas (two pools) ask at once, ten times each: one wins; reopened, it can be taken once again."""
    pools = [await open_pool(database_url, max_size=4) for _ in range(2)]
    await migrate(pools[0])
    budgets = [SharedRefreshBudget(pool, 300) for pool in pools]
    wins = await asyncio.gather(*(b.take(ACCOUNT) for b in budgets for _ in range(10)))
    assert wins.count(True) == 1
    assert await budgets[0].take("another-account") is True  # per account
    await budgets[1].reopen(ACCOUNT)
    assert [await budgets[0].take(ACCOUNT), await budgets[1].take(ACCOUNT)] == [True, False]
    for pool in pools:
        await pool.close()


async def test_the_budget_closes_again_once_its_interval_has_passed(database_url: str) -> None:
    pool = await open_pool(database_url, max_size=1)
    await migrate(pool)
    budget = SharedRefreshBudget(pool, 0.3)
    assert await budget.take(ACCOUNT) is True and await budget.take(ACCOUNT) is False
    await asyncio.sleep(0.4)
    assert await budget.take(ACCOUNT) is True
    await pool.close()


async def test_two_replicas_behind_an_always_401_path_spend_one_budget(make_rig: RigFactory, database_url: str,
                                                                       aiohttp_client: Any) -> None:
    """20 calls to a path amoCRM always answers 401, alternating between two replicas: one refresh in all
    within the interval, not one per replica (budgets kept per replica spend two here)."""
    rig = await make_rig(run_refresher=False, database_url=database_url, rate_limit=50, sandbox_rate_limit=50)
    await rig.connect()
    other = await _second_gateway(rig, aiohttp_client)
    async with rig.client.session.post(f"{rig.sandbox_url}/_sandbox/faults",
                                       json={"unauthorized_paths": [DENIED]}) as switched:
        assert switched.status == 200
    before = rig.sandbox.refresh_attempts
    for i in range(20):
        client = other if i % 2 else rig.client
        resp = await client.get(rig.url(f"/proxy{DENIED}?i={i}"), headers=CONSUMER)
        assert resp.status == 401
    spent = rig.sandbox.refresh_attempts - before
    assert spent == 1, spent
    assert rig.sandbox.refresh_tokens_reused == 0


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AMO_") and k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "amo_gateway", *args], capture_output=True, text=True,
                          env={**base, **env}, timeout=60, check=False)


async def test_authorize_url_import_token_and_restore_change_the_database(make_rig: RigFactory, database_url: str,
                                                                         tmp_path: Path) -> None:
    """With AMO_DATABASE_URL the CLI's writers reach the database a running replica reads, never a vault file:
    authorize-url's state, import-token's account (served at once), and restore (its spent token found out at
    once by the running replica, the account the backup lacks gone), each one audited in the shared trail."""
    rig = await make_rig(database_url=database_url)
    await rig.connect()
    key_file = tmp_path / "vault-key"
    key_file.write_text("\n".join(rig.keys.keys) + "\n")
    vault_path = tmp_path / "state" / "vault.enc"
    env = {"AMO_VAULT_KEY_FILE": str(key_file), "AMO_VAULT_PATH": str(vault_path), "AMO_DATABASE_URL": database_url,
           "AMO_CLIENT_ID": "client-1"}
    view = PgVaultView(database_url, rig.keys)
    states = len(view.load().states)
    issued = await asyncio.to_thread(_cli, "authorize-url", env=env)
    assert issued.returncode == 0, issued.stderr
    assert "state=" in issued.stdout and len(view.load().states) == states + 1

    token = _jwt({"account_id": 4242, "exp": int(time.time()) + 86400 * 3})
    (tmp_path / "token").write_text(token)
    imported = await asyncio.to_thread(_cli, "import-token", str(tmp_path / "token"), "--host", "acme.amocrm.ru",
                                       env=env)
    assert imported.returncode == 0, imported.stderr
    resp = await rig.client.get(rig.url("/token?account=4242"), headers=rig.admin)
    assert (await resp.json())["access_token"] == token

    backup = tmp_path / "backup.enc"
    backed_up = view.load().accounts[ACCOUNT]
    Vault(backup, rig.keys).save(VaultData(accounts={ACCOUNT: backed_up}))
    assert backed_up.tokens is not None
    await rig.app[MANAGER].refresh(ACCOUNT, seen=backed_up.tokens.access_token)  # amoCRM spends the backup's token
    attempts = rig.sandbox.refresh_attempts
    assert attempts == 1
    restored = await asyncio.to_thread(_cli, "restore", str(backup), env=env)
    assert restored.returncode == 0, restored.stderr
    for _ in range(160):
        account = (await rig.app[STORE].reload()).accounts[ACCOUNT]
        if account.status == REAUTH_REQUIRED:
            break
        await asyncio.sleep(0.05)
    assert account.status == REAUTH_REQUIRED and (account.reason or "").startswith("token_revoked"), account.reason
    assert rig.sandbox.refresh_attempts == attempts + 1
    assert "4242" not in view.load().accounts and not vault_path.exists()
    trail = [json.loads(line)["event"] for line in await rig.app[AUDIT].recent(100)]
    assert "vault.restored" in trail
