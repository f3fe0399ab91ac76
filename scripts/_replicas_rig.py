"""The rig of scripts/replicas.py: three gateway processes on one database, and the proxy-burst scenario.

The database is tests/pg.py's throwaway server; the sandbox's own records (/_sandbox/arrivals, its refresh
tokens' liveness) are the judge, never the gateway's word.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from _harness import ACCOUNT_ID, Harness, max_in_window

from amo_gateway.vault import KeyRing
from tests.pg import PgVaultView

REPLICAS = 3
READY_LIMIT = 30.0  # seconds a (re)started replica gets to answer /readyz 200
RATE_LIMIT = 7  # amoCRM's per-account budget, the gateway's default AMO_RATE_LIMIT


def jwt_exp(token: str) -> float:
    """The sandbox's own expiry claim of an access token (a JWT); the token itself is never kept or shown."""
    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


class Rig(Harness):
    """The process harness with every replica on the database and a state directory of its own."""

    def __init__(self, workdir: Path, database_url: str, access_ttl: int) -> None:
        super().__init__(workdir, access_ttl=access_ttl, gateways=REPLICAS, extra_env={
            "AMO_DATABASE_URL": database_url,
            "AMO_UPSTREAM_TIMEOUT": "1",  # README: short-lived tokens want short leases (3 x 1 + 5 = 8 s)
        })

    def env(self, index: int) -> dict[str, str]:
        env = super().env(index)
        env["AMO_VAULT_PATH"] = str(self.workdir / f"replica-{index}" / "vault.enc")  # audit, outbox: per box
        return env

    async def ready(self, index: int) -> bool:
        assert self.session is not None
        url = f"http://127.0.0.1:{self.ports[index]}/readyz"
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status == 200
        return False

    async def until_ready(self, index: int, limit: float = READY_LIMIT) -> float:
        """Seconds until /readyz answers 200 (RuntimeError past the limit)."""
        started = time.monotonic()
        while not await self.ready(index):
            if time.monotonic() - started > limit:
                raise RuntimeError(f"replica {index} not ready within {limit} s")
            await asyncio.sleep(0.05)
        return time.monotonic() - started


def accepts(url: str) -> bool:
    """Whether a new connection to the database succeeds now."""
    with contextlib.suppress(psycopg.OperationalError):
        with psycopg.connect(url, connect_timeout=1) as conn:
            conn.execute("SELECT 1")
            return True
    return False


async def stored_pair(h: Rig, url: str) -> tuple[str, bool]:
    """The account's status in the database, and whether its refresh token is the one the sandbox accepts.

    The pair rotates every 1.5 s: a refresh between reading the row and asking the sandbox spends the token
    just read, so a dead answer is asked again with the row re-read (a token really lost stays dead).
    """
    view = PgVaultView(url, KeyRing.parse(h.key_file.read_text()))
    status, live = "absent", False
    for _ in range(10):
        account = (await asyncio.to_thread(view.load)).accounts.get(ACCOUNT_ID)
        status = account.status if account is not None else "absent"
        live = account is not None and account.tokens is not None and await h.is_live(account.tokens.refresh_token)
        if live:
            break
        await asyncio.sleep(0.2)
    return status, live


def spread(values: list[float]) -> dict[str, float | None]:
    """Least, median and most of some durations."""
    ordered = sorted(values)
    return {"min": rounded(ordered[0] if ordered else None), "median": rounded(ordered[len(ordered) // 2]
            if ordered else None), "max": rounded(ordered[-1] if ordered else None)}


def rounded(value: float | None) -> float | None:
    """Milliseconds are enough for any duration reported."""
    return None if value is None else round(value, 3)


async def arrivals(h: Rig) -> dict[str, Any]:
    """The sandbox's record of when /api/v4 calls and refreshes arrived."""
    status, body = await h.get_json(f"{h.sandbox_url}/_sandbox/arrivals")
    assert status == 200, body
    return dict(body)


async def budget(h: Rig, calls: int) -> dict[str, Any]:
    """Scenario B: `calls` concurrent proxied calls through each replica at once; amoCRM's side judged."""
    assert h.session is not None
    before = len((await arrivals(h))["api"].get(ACCOUNT_ID, []))
    rejected_before = (await h.stats())["rate_limited"]
    served: list[Counter[int]] = [Counter() for _ in range(REPLICAS)]
    first: list[float | None] = [None] * REPLICAS
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=calls * REPLICAS / RATE_LIMIT * 2 + 30)

    async def call(index: int) -> None:
        try:
            async with h.session.get(h.url(index, "/proxy/api/v4/account"), headers=h.admin,  # type: ignore[union-attr]
                                     timeout=timeout) as resp:
                await resp.read()
                served[index][resp.status] += 1
        except (aiohttp.ClientError, OSError, TimeoutError):
            served[index][0] += 1  # no answer at all
        if first[index] is None:
            first[index] = time.monotonic() - started

    await asyncio.gather(*(call(i) for _ in range(calls) for i in range(REPLICAS)))
    duration = time.monotonic() - started
    times = (await arrivals(h))["api"].get(ACCOUNT_ID, [])[before:]
    stats = await h.stats()
    busiest = max_in_window(times)
    failures = [f"{busiest} requests reached the sandbox within one second (limit {RATE_LIMIT})"] \
        if busiest > RATE_LIMIT else []
    failures += [f"replica {i}: {calls - c[200]} of {calls} callers got no 200 ({dict(c)})"
                 for i, c in enumerate(served) if c[200] != calls]
    if len(times) < calls * REPLICAS:
        failures.append(f"the sandbox saw {len(times)} requests for {calls * REPLICAS} calls")
    return {
        "calls_per_replica": calls, "requests_seen_by_sandbox": len(times),
        "max_requests_in_any_1s_window": busiest, "sandbox_429s": stats["rate_limited"] - rejected_before,
        "served_per_replica": [dict(c) for c in served], "first_answer_per_replica_s": [rounded(f) for f in first],
        "duration_s": round(duration, 3), "failures": failures,
    }


