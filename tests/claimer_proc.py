"""A second process that refreshes one account over a shared vault, pausing between amoCRM's answer and the store.

Run by tests/test_lock_discipline.py as `python tests/claimer_proc.py`, its settings as JSON on stdin. The pause
is the test's window: amoCRM has spent the refresh token, its answer is in this process's hands, nothing is stored yet,
and this process holds the account's refresh lock. It writes `<pause_dir>/answered` when it gets there and
carries on once `<pause_dir>/go` exists. It prints the outcome as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amo_gateway.amo_client import AmoClient  # the path above makes it importable
from amo_gateway.clock import SystemClock
from amo_gateway.locks import RefreshLocks
from amo_gateway.manager import TokenManager
from amo_gateway.store import Store
from amo_gateway.vault import KeyRing, Vault

PAUSE_LIMIT = 30.0  # seconds: the test always says go long before; never hang a CI run


class PausingClient(AmoClient):
    """An AmoClient that holds amoCRM's refresh answer until the test says go."""

    pause_dir: Path

    async def token_from_refresh(self, base_url: str, refresh_token: str) -> dict[str, Any]:
        body = await super().token_from_refresh(base_url, refresh_token)
        (self.pause_dir / "answered").touch()
        for _ in range(int(PAUSE_LIMIT / 0.01)):
            if (self.pause_dir / "go").exists():
                break
            await asyncio.sleep(0.01)
        return body


async def main(config: dict[str, Any]) -> dict[str, Any]:
    """Build the token core as a gateway process would, refresh once, report what happened."""
    vault_path = Path(config["vault_path"])
    vault = Vault(vault_path, KeyRing.parse(config["keys"]))
    locks = RefreshLocks(vault_path.with_name(vault_path.name + ".refresh.lock"))
    async with aiohttp.ClientSession() as session:
        client = PausingClient(session, client_id=config["client_id"], client_secret=config["client_secret"],
                               redirect_uri=config["redirect_uri"], timeout=10)
        client.pause_dir = Path(config["pause_dir"])
        manager = TokenManager(Store(vault), client, locks, SystemClock(), margin=config["margin"])
        outcome = (await manager.refresh_due([config["account_id"]]))[0]
    locks.close()
    return {"result": outcome.result, "reason": outcome.reason}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.stdin.readline())))))
