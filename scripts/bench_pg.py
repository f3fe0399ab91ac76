"""Scale benchmark of the PostgreSQL backend: start-up, one account's update and RSS at many accounts, and the
refreshes per second the scheduler sustains against the sandbox. A throwaway server (tests/pg.py) on loopback.

Prints figures; asserts nothing. Each size runs in a fresh subprocess so its RSS is its own.
Usage: python scripts/bench_pg.py [--sizes 1000,100000] [--updates 300] [--refresh-accounts 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.fernet import Fernet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amo_gateway.amo_client import AmoClient
from amo_gateway.backends.postgres import PgStore
from amo_gateway.clock import SystemClock
from amo_gateway.manager import Outcome, TokenManager
from amo_gateway.sandbox import (
    SANDBOX_STATE,
    LoopbackResolver,
    SandboxAccount,
    SandboxConfig,
    create_sandbox_app,
)
from amo_gateway.tokens import Account, TokenPair, VaultData
from amo_gateway.vault import KeyRing
from scripts.bench_accounts import fake_vault, rss_kib
from tests.pg import throwaway_postgres


def _ms(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 1 else values[0] * 1000


async def seed(url: str, key: str, n: int) -> dict[str, Any]:
    """Inside a subprocess of its own (its memory is not the measured one): n accounts into the database."""
    seeder = PgStore(url, KeyRing([key]))
    await seeder.open()
    data = fake_vault(n, time.time())
    started = time.perf_counter()
    ids = list(data.accounts)
    for chunk in range(0, n, 5000):
        await seeder.import_all(VaultData(accounts={i: data.accounts[i] for i in ids[chunk:chunk + 5000]}))
    await seeder.close()
    return {"seed_s": time.perf_counter() - started}


async def one_size(url: str, key: str, n: int, updates: int) -> dict[str, Any]:
    """Inside a subprocess: start-up over n stored accounts, single-account updates and a refresh's two steps."""
    keys = KeyRing([key])
    base = rss_kib()
    store = PgStore(url, keys)
    started = time.perf_counter()
    await store.open()
    startup_s = time.perf_counter() - started
    ids = list((await store.snapshot()).accounts)
    puts, refreshes = [], []
    for i in range(updates):
        account = (await store.snapshot()).accounts[ids[(i * 7919) % n]]
        started = time.perf_counter()
        await store.put_account(account)
        puts.append(time.perf_counter() - started)
    for i in range(updates):
        account_id = ids[(i * 104729) % n]
        started = time.perf_counter()
        await store.claim([account_id], time.time() + 10 * 86400, 3600, None, skip_locked=True)
        pair = TokenPair("eyJ" + secrets.token_urlsafe(660), "def502" + secrets.token_hex(250), time.time() + 86400,
                         time.time())
        await store.store_outcomes([Outcome(account_id, "refreshed", pair=pair)], time.time())
        refreshes.append(time.perf_counter() - started)
    await store.close()
    return {"accounts": n, "startup_s": startup_s, "update_p50_ms": _ms(puts, 50),
            "update_p99_ms": _ms(puts, 99), "refresh_steps_p50_ms": _ms(refreshes, 50),
            "refresh_steps_p99_ms": _ms(refreshes, 99), "rss_mib": rss_kib() / 1024,
            "rss_delta_mib": (rss_kib() - base) / 1024}


async def refresh_rate(url: str, n: int) -> dict[str, Any]:
    """n due accounts refreshed by the manager's batch path (leases, SKIP LOCKED claim, one store)."""
    import aiohttp

    accounts = [SandboxAccount(20_000_000 + i, f"acct{i}") for i in range(n)]
    config = SandboxConfig("bench-client", secrets.token_hex(32), "http://127.0.0.1:9/cb", accounts,
                           rate_limit=10**6, api_domain="api-b.amocrm.ru")
    sandbox = create_sandbox_app(config)
    runner = web.AppRunner(sandbox, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    state = sandbox[SANDBOX_STATE]
    store = PgStore(url, KeyRing([Fernet.generate_key().decode()]))
    await store.open()
    long_ago = time.time() - 86000
    data = VaultData()
    for account in accounts:
        minted = state.redeem_code(state.issue_code(account.account_id), account, "api-b.amocrm.ru")
        data.accounts[str(account.account_id)] = Account(
            str(account.account_id), f"http://acct{account.account_id - 20_000_000}.amocrm.ru:{port}",
            TokenPair(minted.access_token, minted.refresh_token, long_ago + 86400, long_ago))
    await store.import_all(data)
    connector = aiohttp.TCPConnector(resolver=LoopbackResolver(), limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = AmoClient(session, client_id="bench-client", client_secret=config.client_secret,
                           redirect_uri=config.redirect_uri, timeout=30)
        locks = store.refresh_locks()
        manager = TokenManager(store, client, locks, SystemClock(), margin=3600)
        started = time.perf_counter()
        outcomes = await manager.refresh_due(list(data.accounts))
        elapsed = time.perf_counter() - started
    await store.close()
    await runner.cleanup()
    done = sum(o.result == "refreshed" for o in outcomes)
    return {"accounts": n, "refreshed": done, "seconds": elapsed, "refreshes_per_s": done / elapsed,
            "reused": state.refresh_tokens_reused}


def _child(*argv: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True, timeout=3600)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--refresh-accounts", type=int, default=2000)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--seed", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed is not None:
        url, key, n = args.seed
        print(json.dumps(asyncio.run(seed(url, key, int(n)))))
        return 0
    if args.one is not None:
        url, key, n = args.one
        print(json.dumps(asyncio.run(one_size(url, key, int(n), args.updates))))
        return 0
    with throwaway_postgres() as server:
        if isinstance(server, str):
            print(server, file=sys.stderr)
            return 1
        print(f"{'accounts':>9} {'seed s':>7} {'start-up s':>10} {'update p50/p99 ms':>18} "
              f"{'refresh steps p50/p99 ms':>25} {'RSS MiB':>8} {'RSS +MiB':>9}")
        for n in (int(s) for s in args.sizes.split(",")):
            where = [server.database(), Fernet.generate_key().decode(), str(n)]
            r = _child("--seed", *where) | _child("--one", *where, "--updates", str(args.updates))
            print(f"{r['accounts']:>9} {r['seed_s']:>7.1f} {r['startup_s']:>10.2f} "
                  f"{r['update_p50_ms']:>8.2f} / {r['update_p99_ms']:<7.2f} "
                  f"{r['refresh_steps_p50_ms']:>12.2f} / {r['refresh_steps_p99_ms']:<10.2f} "
                  f"{r['rss_mib']:>8.1f} {r['rss_delta_mib']:>9.1f}")
        r = asyncio.run(refresh_rate(server.database(), args.refresh_accounts))
        print(f"refresh storm: {r['refreshed']}/{r['accounts']} accounts in {r['seconds']:.2f} s = "
              f"{r['refreshes_per_s']:.0f} refreshes/s (sandbox in-process), refresh tokens reused: {r['reused']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
