"""Scale benchmark for many accounts: vault start-up, save time and memory at 1 / 1 000 / 10 000 accounts,
and the refreshes per second the scheduler sustains against the sandbox (same machine, loopback).

Prints figures; asserts nothing. Each size runs in a fresh subprocess so its RSS is its own.
Usage: python scripts/bench_accounts.py [--sizes 1,1000,10000] [--refresh-accounts 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.fernet import Fernet

from amo_gateway.amo_client import AmoClient
from amo_gateway.clock import SystemClock
from amo_gateway.locks import RefreshLocks
from amo_gateway.manager import TokenManager
from amo_gateway.sandbox import SANDBOX_STATE, LoopbackResolver, SandboxAccount, SandboxConfig, create_sandbox_app
from amo_gateway.store import Store
from amo_gateway.tokens import Account, TokenPair, VaultData
from amo_gateway.vault import KeyRing, Vault


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fake_vault(n: int, now: float) -> VaultData:
    """n connected accounts with realistic token sizes (a ~900-byte JWT and a ~500-byte refresh token)."""
    accounts = {}
    for i in range(n):
        pair = TokenPair("eyJ" + secrets.token_urlsafe(660), "def502" + secrets.token_hex(250), now + 86400, now)
        accounts[str(10_000_000 + i)] = Account(str(10_000_000 + i), f"https://acct{i}.amocrm.ru", pair,
                                                api_domain="api-b.amocrm.ru", subdomain=f"acct{i}",
                                                refresh_obtained_at=now, connected_at=now)
    return VaultData(accounts=accounts)


def one_size(n: int, rounds: int) -> dict[str, Any]:
    """Runs inside a subprocess: save, start-up (decrypt + parse) and memory for n accounts."""
    base = rss_kib()
    with tempfile.TemporaryDirectory() as tmp:
        vault = Vault(Path(tmp) / "v" / "vault.enc", KeyRing([Fernet.generate_key().decode()]))
        vault.prepare()
        data = fake_vault(n, time.time())
        saves, loads, changes = [], [], []
        for _ in range(rounds):
            started = time.perf_counter()
            vault.save(data)
            saves.append(time.perf_counter() - started)
        for _ in range(rounds):
            started = time.perf_counter()
            fresh = Vault(vault.path, vault.keys)  # a new process: prepare + one locked decrypt/parse
            fresh.prepare()
            loaded, _ = fresh.read()
            loads.append(time.perf_counter() - started)
        assert len(loaded.accounts) == n
        for i in range(rounds):  # one locked read-modify-write, as a callback or a single refresh does
            started = time.perf_counter()
            vault.update(lambda d, i=i: d.exchange_slots.__setitem__(f"slot{i}", time.time() + 300))
            changes.append(time.perf_counter() - started)
        cold = []
        for i in range(rounds):  # the same by an object that has not seen the file (another process wrote last)
            other = Vault(vault.path, vault.keys)
            started = time.perf_counter()
            other.update(lambda d, i=i: d.exchange_slots.__setitem__(f"cold{i}", time.time() + 300))
            cold.append(time.perf_counter() - started)
        size = vault.path.stat().st_size
    return {"accounts": n, "save_ms": statistics.median(saves) * 1000, "startup_ms": statistics.median(loads) * 1000,
            "update_ms": statistics.median(changes) * 1000, "update_cold_ms": statistics.median(cold) * 1000,
            "file_kib": size / 1024, "rss_mib": rss_kib() / 1024, "rss_delta_mib": (rss_kib() - base) / 1024}


async def refresh_rate(n: int) -> dict[str, Any]:
    """n due accounts refreshed by the manager's batch path against an in-process sandbox."""
    import aiohttp

    accounts = [SandboxAccount(20_000_000 + i, f"acct{i}") for i in range(n)]
    config = SandboxConfig("bench-client", secrets.token_hex(32), "http://127.0.0.1:9/cb", accounts,
                           rate_limit=10**6, api_domain="api-b.amocrm.ru")
    sandbox = create_sandbox_app(config)
    runner = web.AppRunner(sandbox, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state = sandbox[SANDBOX_STATE]
    with tempfile.TemporaryDirectory() as tmp:
        vault = Vault(Path(tmp) / "v" / "vault.enc", KeyRing([Fernet.generate_key().decode()]))
        vault.prepare()
        long_ago = time.time() - 86000
        data = VaultData()
        for account in accounts:
            minted = state.redeem_code(state.issue_code(account.account_id), account, "api-b.amocrm.ru")
            pair = TokenPair(minted.access_token, minted.refresh_token, long_ago + 86400, long_ago)
            data.accounts[str(account.account_id)] = Account(
                str(account.account_id), f"http://acct{account.account_id - 20_000_000}.amocrm.ru:{port}", pair)
        vault.save(data)
        saves = _count_saves(vault)
        connector = aiohttp.TCPConnector(resolver=LoopbackResolver(), limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            client = AmoClient(session, client_id="bench-client", client_secret=config.client_secret,
                               redirect_uri=config.redirect_uri, timeout=30)
            locks = RefreshLocks(Path(tmp) / "v" / "refresh.lock")
            manager = TokenManager(Store(vault), client, locks, SystemClock(), margin=3600)
            started = time.perf_counter()
            outcomes = await manager.refresh_due(list(data.accounts))
            elapsed = time.perf_counter() - started
            locks.close()
    await runner.cleanup()
    done = sum(o.result == "refreshed" for o in outcomes)
    return {"accounts": n, "refreshed": done, "seconds": elapsed, "refreshes_per_s": done / elapsed,
            "reused": state.refresh_tokens_reused, "vault_writes": saves[0]}


def _count_saves(vault: Vault) -> list[int]:
    """Count the vault's writes from now on (one list cell, so the caller reads the running total)."""
    count, save = [0], vault.save

    def counting(data: VaultData) -> None:
        count[0] += 1
        save(data)

    vault.save = counting  # type: ignore[method-assign]
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1,1000,10000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--refresh-accounts", type=int, default=2000)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.rounds)))
        return 0
    print(f"{'accounts':>9} {'start-up ms':>12} {'save ms':>9} {'update ms':>10} {'cold upd ms':>12} {'file KiB':>9} "
          f"{'RSS MiB':>8} "
          f"{'RSS +MiB':>9}")
    for n in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--rounds", str(args.rounds)],
                             capture_output=True, text=True, check=True, timeout=600)
        r = json.loads(out.stdout)
        print(f"{r['accounts']:>9} {r['startup_ms']:>12.1f} {r['save_ms']:>9.1f} {r['update_ms']:>10.1f} "
              f"{r['update_cold_ms']:>12.1f} "
              f"{r['file_kib']:>9.0f} "
              f"{r['rss_mib']:>8.1f} {r['rss_delta_mib']:>9.1f}")
    r = asyncio.run(refresh_rate(args.refresh_accounts))
    print(f"refresh storm: {r['refreshed']}/{r['accounts']} accounts in {r['seconds']:.2f} s = "
          f"{r['refreshes_per_s']:.0f} refreshes/s (sandbox in-process, {r['vault_writes']} vault writes), "
          f"refresh tokens reused: "
          f"{r['reused']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
