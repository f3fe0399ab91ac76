"""Soak: sustained load on /token, /test, the proxy and /accounts while tokens rotate; memory stays flat.

Runs one real gateway against the standalone sandbox with a short access TTL (a refresh every ttl/2 s),
then drives it with wrk (one wrk per endpoint; a Python aiohttp loop when wrk is not installed) for
`--seconds`, sampling the gateway's resident memory from /proc/<pid>/status once a second. Passes only
when everything the README promises held: every answer 2xx (no 429 either: the load stays within the
queue), amoCRM (the sandbox) never answered 429 and never saw more than the rate limit in any one-second
span, no refresh token was presented twice, the gateway ends connected, and RSS grew less than
`--rss-slack-kib` between the end of the warm-up and the end.
Usage: python scripts/soak.py --seconds 120 [--report out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from _harness import CONSUMER, Harness, report, rss_kib

RATE_LIMIT = 7  # amoCRM's per-account budget, the gateway's default AMO_RATE_LIMIT
CONSUMER_BEARER = {"Authorization": f"Bearer {CONSUMER.split(':', 1)[1]}"}
# endpoint name -> (path under the prefix, whose bearer to send, connections)
TARGETS = {"token": ("/token", "consumer", 8), "test": ("/test", None, 8),
           "proxy": ("/proxy/api/v4/leads", "consumer", 4), "accounts": ("/accounts", "operator", 2)}
WRK_LUA = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
  end
  io.write("STATUSES")
  for k, v in pairs(total) do io.write(string.format(" %d=%d", k, v)) end
  io.write(string.format("\\nLAT_P99_MS %.2f\\n", latency:percentile(99) / 1000))
end
"""


async def wrk(url: str, headers: dict[str, str], connections: int, seconds: float, lua: Path) -> dict[str, Any]:
    """One wrk run; the Lua script reports every status code it saw and the p99 latency."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s", "-s", str(lua)]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    proc = await asyncio.create_subprocess_exec(*args, url, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), seconds + 60))[0].decode()
    statuses = Counter({int(k): int(v) for k, v in re.findall(r"(\d+)=(\d+)", _line(out, "STATUSES"))})
    socket_line = _line(out, "Socket errors")
    socket_errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", socket_line))
    p99 = float(_line(out, "LAT_P99_MS").split()[-1] or 0) if "LAT_P99_MS" in out else None
    return {"statuses": statuses, "socket_errors": socket_errors, "p99_ms": p99}


def _line(text: str, prefix: str) -> str:
    return next((ln for ln in text.splitlines() if ln.strip().startswith(prefix)), "")


async def python_load(url: str, headers: dict[str, str], connections: int, seconds: float) -> dict[str, Any]:
    """The fallback without wrk: `connections` aiohttp loops, each one request at a time."""
    statuses: Counter[int] = Counter()
    errors = 0
    until = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def loop() -> None:
            nonlocal errors
            while time.monotonic() < until:
                try:
                    async with session.get(url, headers=headers) as resp:
                        await resp.read()
                        statuses[resp.status] += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1

        await asyncio.gather(*(loop() for _ in range(connections)))
    return {"statuses": statuses, "socket_errors": errors, "p99_ms": None}


async def sample_rss(pid: int, until: float, samples: list[tuple[float, int]]) -> None:
    """Resident memory once a second until the deadline."""
    start = time.monotonic()
    while time.monotonic() < until:
        samples.append((round(time.monotonic() - start, 1), rss_kib(pid)))
        await asyncio.sleep(1.0)


async def drive(h: Harness, seconds: float, use_wrk: bool, workdir: Path) -> dict[str, dict[str, Any]]:
    """Load every target at once for `seconds`."""
    lua = workdir / "statuses.lua"
    lua.write_text(WRK_LUA)
    runs = []
    for path, bearer, connections in TARGETS.values():
        headers = {"consumer": CONSUMER_BEARER, "operator": h.admin}.get(bearer or "", {})
        url = h.url(0, path)
        runs.append(wrk(url, headers, connections, seconds, lua) if use_wrk
                    else python_load(url, headers, connections, seconds))
    results = await asyncio.gather(*runs)
    return dict(zip(TARGETS, results, strict=True))


async def run(seconds: float, warmup: float, access_ttl: int, workdir: Path, slack_kib: int) -> dict[str, Any]:
    """Start, connect, warm up, load while sampling memory, then check the tokens."""
    use_wrk = shutil.which("wrk") is not None
    samples: list[tuple[float, int]] = []
    async with Harness(workdir, access_ttl=access_ttl) as h:
        proc = await h.start()
        await h.connect()
        await drive(h, warmup, use_wrk, workdir)  # warm caches, pools and the allocator before measuring
        base = await h.stats()
        sampler = asyncio.create_task(sample_rss(proc.pid, time.monotonic() + seconds, samples))
        results = await drive(h, seconds, use_wrk, workdir)
        await sampler
        end_status, _ = await h.token()
        stats = await h.stats()
        live, state = await _ends_live(h)
    return figures(results, samples, stats, base, seconds, use_wrk, end_status == 200 and live, state, slack_kib)


async def _ends_live(h: Harness, limit: float = 5.0) -> tuple[bool, str]:
    """Whether the vault settles on the sandbox's live refresh token (a refresh may be on the wire right now:
    its token is then spent and marked in flight for a moment, and the new one lands shortly after)."""
    deadline = time.monotonic() + limit
    while True:
        token, _, state = h.vault_refresh()
        if await h.is_live(token) or time.monotonic() > deadline:
            return await h.is_live(token), state
        await asyncio.sleep(0.1)


def figures(results: dict[str, dict[str, Any]], samples: list[tuple[float, int]], stats: dict[str, Any],
            base: dict[str, Any], seconds: float, use_wrk: bool, connected: bool, state: str,
            slack_kib: int) -> dict[str, Any]:
    """The measured figures and the verdict."""
    endpoints, failures = {}, []
    for name, r in results.items():
        total = sum(r["statuses"].values())
        bad = {s: n for s, n in r["statuses"].items() if not 200 <= s < 300}
        endpoints[name] = {"requests": total, "rps": round(total / seconds, 1), "statuses": dict(r["statuses"]),
                           "errors": sum(bad.values()) + r["socket_errors"], "p99_ms": r["p99_ms"]}
        if bad or r["socket_errors"]:
            failures.append(f"{name}: unexpected answers {bad}, socket errors {r['socket_errors']}")
    rss = [kib for _, kib in samples if kib]
    growth = rss[-1] - rss[0] if rss else 0
    if growth > slack_kib:
        failures.append(f"RSS grew {growth} KiB (> {slack_kib} KiB)")
    if stats["refresh_tokens_reused"]:
        failures.append(f"refresh tokens reused: {stats['refresh_tokens_reused']}")
    upstream_429 = stats["rate_limited"] - base["rate_limited"]
    if upstream_429:
        failures.append(f"amoCRM answered 429 {upstream_429} times")
    busiest = max(stats["max_requests_in_window"].values(), default=0)
    if busiest > RATE_LIMIT:
        failures.append(f"amoCRM saw {busiest} requests in one second (limit {RATE_LIMIT})")
    if not connected:
        failures.append(f"the gateway did not end connected with the live refresh token ({state})")
    return {"load_tool": "wrk" if use_wrk else "python-aiohttp", "seconds": seconds, "endpoints": endpoints,
            "refreshes_during_load": stats["refresh_attempts"] - base["refresh_attempts"],
            "refresh_tokens_reused": stats["refresh_tokens_reused"],
            "upstream_rate_limited": upstream_429, "upstream_max_requests_in_any_second": busiest,
            "rss_kib": {"start": rss[0] if rss else None, "end": rss[-1] if rss else None,
                        "max": max(rss, default=None), "growth": growth, "samples": len(rss)},
            "failures": failures}


def main() -> int:
    """Parse flags, run, print the figures (and write them as JSON when asked)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--warmup", type=float, default=10)
    p.add_argument("--access-ttl", type=int, default=4)
    p.add_argument("--rss-slack-kib", type=int, default=8192)
    p.add_argument("--report", type=Path, help="write the figures here as JSON")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="amo-soak-") as tmp:
        result = asyncio.run(run(args.seconds, args.warmup, args.access_ttl, Path(tmp), args.rss_slack_kib))
    return report(result, args.report)


if __name__ == "__main__":
    sys.exit(main())
