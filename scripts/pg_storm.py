"""A refresh storm on the PostgreSQL backend, each party in a process of its own so that each one's CPU is its own.

The sandbox (one process or more, each serving a share of the accounts on its own port, the account's base URL
naming the port) mints every account's first pair. The gateway process imports the due accounts among `total`
stored ones, opens the store as `serve` does, and runs the scheduler's own path once: `Refresher.tick()` plans,
takes the leases in one statement, claims with one SKIP LOCKED transaction (in-flight markers committed before
any call), calls the sandbox, stores every answer in one transaction. Afterwards the gateway reads the stored rows
back from the database and each sandbox says which refresh tokens it saw twice and which one is live per account.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import uvloop
from aiohttp import web

from amo_gateway.amo_client import AmoClient
from amo_gateway.backends.pg_schema import Sealer
from amo_gateway.backends.postgres import PgStore
from amo_gateway.clock import SystemClock
from amo_gateway.logs import configure
from amo_gateway.manager import SHARED_BATCH, Outcome, TokenManager
from amo_gateway.refresher import Refresher
from amo_gateway.sandbox import SANDBOX_STATE, LoopbackResolver, SandboxAccount, SandboxConfig, create_sandbox_app
from amo_gateway.tokens import Account, TokenPair, VaultData, fingerprint
from amo_gateway.vault import KeyRing

CLIENT_ID, REDIRECT = "bench-client", "http://127.0.0.1:9/cb"
FIRST_ID = 20_000_000  # storm accounts; the background accounts of bench_accounts.fake_vault start at 10_000_000
MARGIN = 3600.0  # AMO_REFRESH_MARGIN's default
TIMEOUT = 10.0  # AMO_UPSTREAM_TIMEOUT's default
SANDBOX_LIFETIME = 1800.0  # a sandbox whose parent vanished stops by itself


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of these processes and their children (PostgreSQL's backends are the postmaster's)."""
    tick = os.sysconf("SC_CLK_TCK")
    wanted, total = set(pids), 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(entry.name) in wanted or int(fields[1]) in wanted:
                total += (int(fields[11]) + int(fields[12])) / tick
    return total


def sandbox_app(first: int, n: int, secret: str, pairs_path: str) -> web.Application:
    """A sandbox for accounts first..first+n-1, their first pairs minted into pairs_path (for the gateway)."""
    accounts = [SandboxAccount(FIRST_ID + i, f"acct{i}") for i in range(first, first + n)]
    config = SandboxConfig(CLIENT_ID, secret, REDIRECT, accounts, rate_limit=10**6, api_domain="api-b.amocrm.ru",
                           seed_entities=0)
    app = create_sandbox_app(config)
    state = app[SANDBOX_STATE]
    pairs = {str(a.account_id): state.redeem_code(state.issue_code(a.account_id), a, "api-b.amocrm.ru")
             for a in accounts}
    Path(pairs_path).write_text(json.dumps({k: [p.access_token, p.refresh_token] for k, p in pairs.items()}))
    return app


async def sandbox_process(app: web.Application) -> dict[str, Any]:
    """Serve until stdin closes (the port on stdout first); then what the sandbox saw."""
    state = app[SANDBOX_STATE]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(json.dumps({"port": runner.addresses[0][1], "pid": os.getpid()}), flush=True)
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.read(), SANDBOX_LIFETIME)  # the parent closes stdin when the storm is over
    await runner.cleanup()
    live = {str(a): fingerprint(t) for a, t in state.live_refresh_tokens().items()}
    return {"attempts": state.refresh_attempts, "reused": state.refresh_tokens_reused, "live": live}


class TimedStore(PgStore):
    """The PostgreSQL store, timing its two writes of a refresh batch (where a storm's time goes)."""

    phases: dict[str, float]

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await super().claim(*args, **kwargs)
        finally:
            self.phases["claim_s"] = self.phases.get("claim_s", 0.0) + time.perf_counter() - started

    async def store_outcomes(self, outcomes: Sequence[Outcome], now: float) -> dict[str, Account]:
        started = time.perf_counter()
        try:
            return await super().store_outcomes(outcomes, now)
        finally:
            self.phases["store_s"] = self.phases.get("store_s", 0.0) + time.perf_counter() - started


async def import_due(url: str, key: str, shares: list[tuple[int, dict[str, list[str]]]]) -> list[str]:
    """The sandboxes' accounts into the database, each already inside the refresh margin (not measured)."""
    store = PgStore(url, KeyRing([key]))
    await store.open()
    long_ago, ids = time.time() - 86000, []
    for port, minted in shares:
        data = VaultData()
        for account_id, (access, refresh) in minted.items():
            sub = f"acct{int(account_id) - FIRST_ID}"
            data.accounts[account_id] = Account(account_id, f"http://{sub}.amocrm.ru:{port}",
                                                TokenPair(access, refresh, long_ago + 86400, long_ago),
                                                api_domain="api-b.amocrm.ru", subdomain=sub)
        await store.import_all(data)
        ids += list(minted)
    await store.close()
    return ids


async def stored_fingerprints(url: str, key: str, ids: list[str]) -> tuple[dict[str, str], int]:
    """What the database holds now for these accounts (read back, not the gateway's copy): refresh token
    fingerprints, and how many in-flight markers are left."""
    sealer, fps, marked = Sealer(KeyRing([key]), None), {}, 0
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT account_id, sealed, key_fp FROM amo_accounts WHERE account_id = ANY(%s)",
                                 (ids,))
        for account_id, sealed, fp in await cur.fetchall():
            account = Account.from_dict(sealer.open(sealed, fp))
            marked += account.in_flight is not None
            if account.tokens is not None and account.tokens.refresh_token is not None:
                fps[account_id] = fingerprint(account.tokens.refresh_token)
    return fps, marked


async def gateway_process(url: str, key: str, secret: str, shares: list[tuple[int, dict[str, list[str]]]],
                          others: dict[str, list[int]]) -> dict[str, Any]:
    """Import the due accounts, open the store as `serve` does, run one scheduler tick; CPU of every party."""
    configure("json", "info")  # as in production: one JSON line per refresh (stderr goes to a file)
    ids = await import_due(url, key, shares)
    store = TimedStore(url, KeyRing([key]), lease_seconds=3 * TIMEOUT + 5)
    store.phases = {}
    started = time.perf_counter()
    await store.open()
    startup_s = time.perf_counter() - started
    connector = aiohttp.TCPConnector(resolver=LoopbackResolver())  # the app's session: default limits
    async with aiohttp.ClientSession(headers={"User-Agent": "amo-gateway"}, connector=connector) as session:
        client = AmoClient(session, client_id=CLIENT_ID, client_secret=secret, redirect_uri=REDIRECT,
                           timeout=TIMEOUT)
        manager = TokenManager(store, client, store.refresh_locks(), SystemClock(), margin=MARGIN,
                               batch_size=SHARED_BATCH)  # as the app on PostgreSQL
        refresher = Refresher(manager, SystemClock(), margin=MARGIN)
        before = {name: cpu_seconds(pids) for name, pids in others.items()}
        own_before, started = time.process_time(), time.perf_counter()
        outcomes = await refresher.tick()
        seconds = time.perf_counter() - started
        cpu = {"gateway": time.process_time() - own_before}
        cpu |= {name: cpu_seconds(pids) - before[name] for name, pids in others.items()}
    accounts = len((await store.snapshot()).accounts)
    await store.close()
    fps, marked = await stored_fingerprints(url, key, ids)
    results: dict[str, int] = {}
    for outcome in outcomes:
        results[outcome.result] = results.get(outcome.result, 0) + 1
    return {"accounts": accounts, "due": len(ids), "startup_s": startup_s, "seconds": seconds, "results": results,
            "cpu_s": cpu, **store.phases, "stored": fps,
            "markers_left": marked}


def main(argv: list[str]) -> None:
    """`--sandbox FIRST N SECRET PAIRS` or `--gateway URL KEY SECRET SHARES_JSON PIDS_JSON` (bench_pg.py runs us)."""
    logging.getLogger("aiohttp.access").disabled = True
    if argv[0] == "--sandbox":
        seen = on_uvloop(sandbox_process(sandbox_app(int(argv[1]), int(argv[2]), argv[3], argv[4])))
        Path(argv[4] + ".seen").write_text(json.dumps(seen))  # a file: stdin's pipe made stdout non-blocking
        return
    else:
        shares = [(int(port), json.loads(Path(path).read_text())) for port, path in json.loads(argv[4])]
        result = on_uvloop(gateway_process(argv[1], argv[2], argv[3], shares, json.loads(argv[5])))
    print(json.dumps(result), flush=True)


def on_uvloop(main: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """The gateway's own loop (serve.run): uvloop. The sandbox runs on it too, so it is not the bottleneck."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def new_secret() -> str:
    return secrets.token_hex(32)


if __name__ == "__main__":
    main(sys.argv[1:])
