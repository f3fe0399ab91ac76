"""N gateway processes on one vault under short-lived tokens: no refresh token is ever sent twice.

Starts N real `amo-gateway serve` processes sharing one vault file (and its lock files) against the
standalone sandbox with a short access TTL, so every process's background refresher and every `/token`
call compete to refresh. Callers hammer `/token` on every process for the whole run. The sandbox counts
each refresh token presented; the run fails if any was presented twice, if any caller saw an error,
if any process does not end connected with the vault holding the sandbox's live refresh token, or if
fewer than two processes refreshed (one process doing all the work would prove nothing about the locks).
Every process starts before the account is connected: the others learn of it only through the vault file.
Usage: python scripts/multiproc.py --processes 3 --seconds 180 [--report out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _harness import Harness, report

CALLERS_PER_PROCESS = 3
CALL_PAUSE = 0.02  # between one caller's requests: steady pressure, not a flood


async def caller(h: Harness, index: int, until: float, answers: Counter[int]) -> None:
    """GET /token on one process until the deadline, counting statuses."""
    while time.monotonic() < until:
        status, _ = await h.token(index)
        answers[status] += 1
        await asyncio.sleep(CALL_PAUSE)


async def watch(h: Harness, until: float, problems: list[str]) -> None:
    """Every second: no refresh token presented twice so far (stop early with the evidence)."""
    while time.monotonic() < until and not problems:
        stats = await h.stats()
        if stats["refresh_tokens_reused"]:
            problems.append(f"refresh tokens reused: {stats['refresh_tokens_reused']}")
        await asyncio.sleep(1.0)


async def final_checks(h: Harness, processes: int, problems: list[str]) -> list[int]:
    """Each process answers /token 200; the vault's refresh token is the one the sandbox accepts."""
    ends = [(await h.token(i))[0] for i in range(processes)]
    problems.extend(f"process {i} ended with HTTP {s}" for i, s in enumerate(ends) if s != 200)
    token, _, status = h.vault_refresh()
    if not await h.is_live(token) or status != "connected":
        problems.append(f"the vault's refresh token is not the live one (status {status})")
    return ends


async def run(processes: int, seconds: float, access_ttl: int, workdir: Path) -> dict[str, Any]:
    """Start, connect, load, check; returns the figures."""
    answers: Counter[int] = Counter()
    problems: list[str] = []
    async with Harness(workdir, access_ttl=access_ttl, gateways=processes) as h:
        await asyncio.gather(*(h.start(i) for i in range(processes)))
        await h.connect(0)
        until = time.monotonic() + seconds
        callers = [caller(h, i, until, answers) for i in range(processes) for _ in range(CALLERS_PER_PROCESS)]
        await asyncio.gather(watch(h, until, problems), *callers)
        ends = await final_checks(h, processes, problems)
        stats = await h.stats()
        per_process = [await h.refreshed(i) for i in range(processes)]
    if processes > 1 and sum(1 for n in per_process if n) < 2:
        problems.append(f"only one process refreshed ({per_process}): the locks were never contended")
    problems.extend(f"{n} /token answers with HTTP {s}" for s, n in answers.items() if s != 200)
    return {
        "processes": processes, "seconds": seconds, "access_ttl": access_ttl,
        "refreshes": stats["refresh_attempts"], "refreshes_per_process": per_process,
        "refresh_tokens_reused": stats["refresh_tokens_reused"],
        "token_calls": sum(answers.values()), "token_answers": {str(k): v for k, v in answers.items()},
        "final_status_per_process": ends, "live_refresh_tokens": stats["live_refresh_tokens"],
        "failures": problems,
    }


def main() -> int:
    """Parse flags, run, print the figures (and write them as JSON when asked)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--access-ttl", type=int, default=3)
    p.add_argument("--report", type=Path, help="write the figures here as JSON")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="amo-multiproc-") as tmp:
        result = asyncio.run(run(args.processes, args.seconds, args.access_ttl, Path(tmp)))
    return report(result, args.report)


if __name__ == "__main__":
    sys.exit(main())
