"""Benchmark (not a test): GET /token vs a bare aiohttp handler, and a proxied call vs the same call direct.

Everything is a separate process on loopback: the standalone sandbox, `amo-gateway serve`, a bare aiohttp
server returning a constant, and the load generator (`wrk` when installed, else an aiohttp client with N
workers in this process). Each target runs `--seconds` per round, rounds interleaved; medians are printed.
For the proxy comparison the sandbox's rate limit and the gateway's AMO_RATE_LIMIT are set very high so the
7 rps limiter does not dominate; logs are at WARNING in the gateway (no access log), as in the bare server.

    .venv/bin/python scripts/bench.py [--seconds 5] [--rounds 3] [--connections 32] [--python-client]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import API_KEY, LOGIN, ROOT, Harness, _terminate, free_port

HIGH_RATE = "1000000"
BARE_SERVER = """
import sys
from aiohttp import web
async def const(request):
    return web.json_response({"status": "ok"})
app = web.Application()
app.router.add_get("/const", const)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


@dataclass
class Figures:
    """One round against one target."""

    rps: float
    p50_ms: float
    p99_ms: float


class BenchHarness(Harness):
    """The evidence harness with the sandbox's own rate limit out of the way."""

    async def start_sandbox(self) -> None:
        log = (self.workdir / "sandbox.log").open("ab")
        self.sandbox = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "amo_gateway.sandbox", "--port", str(self.sandbox_port),
            "--client-id", self.client_id, "--client-secret", self.client_secret,
            "--redirect-uri", self.redirect_uri, "--access-ttl", "86400", "--exchange-interval", "0",
            "--no-referer", "--api-key", API_KEY, "--login", LOGIN, "--rate-limit", HIGH_RATE,
            stdout=log, stderr=log, cwd=ROOT)
        log.close()
        await self._wait_http(f"{self.sandbox_url}/_sandbox/stats")


async def wrk(url: str, token: str, seconds: float, connections: int) -> Figures:
    """One wrk run (1 thread: the machine has few cores and the server needs them)."""
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-H", f"Authorization: Bearer {token}",
        url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 30)
    text = out.decode()
    if re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        raise RuntimeError(f"{url} answered errors under load:\n{text}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    return Figures(rps, _wrk_ms(text, "50%"), _wrk_ms(text, "99%"))


def _wrk_ms(text: str, pct: str) -> float:
    value, unit = re.search(rf"{pct}\s+([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def python_load(url: str, token: str, seconds: float, connections: int) -> Figures:
    """The fallback generator: `connections` workers looping GETs for `seconds`, keep-alive on."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=connections)

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            async with session.get(url, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status} under load")
            latencies.append(time.perf_counter() - start)

    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.perf_counter() - began
    cuts = statistics.quantiles(latencies, n=100)
    return Figures(len(latencies) / elapsed, cuts[49] * 1000, cuts[98] * 1000)


async def run(args: argparse.Namespace) -> int:
    use_wrk = shutil.which("wrk") is not None and not args.python_client
    load = wrk if use_wrk else python_load
    with tempfile.TemporaryDirectory(prefix="amo-bench-") as tmp:
        harness = BenchHarness(Path(tmp), access_ttl=86400,
                               extra_env={"AMO_RATE_LIMIT": HIGH_RATE, "AMO_PROXY_QUEUE": "100000"})
        async with harness:
            bare_port = free_port()
            bare = await asyncio.create_subprocess_exec(sys.executable, "-c", BARE_SERVER, str(bare_port))
            try:
                await harness.start()
                await harness.connect()
                await harness._wait_http(f"http://127.0.0.1:{bare_port}/const", proc=bare)
                targets = await _targets(harness, bare_port)
                results = await _rounds(targets, load, args)
            finally:
                await _terminate(bare)
    _report(results, "wrk" if use_wrk else "python aiohttp client", args)
    return 0


async def _targets(harness: Harness, bare_port: int) -> dict[str, tuple[str, str]]:
    status, body = await harness.token()
    assert status == 200, body
    consumer = "consumer-secret-for-soak"
    return {
        "bare handler": (f"http://127.0.0.1:{bare_port}/const", "x"),
        "GET /token": (harness.url(0, "/token"), consumer),
        "direct sandbox": (f"{harness.sandbox_url}/api/v4/leads", body["access_token"]),
        "proxied": (harness.url(0, "/proxy/api/v4/leads"), consumer),
    }


async def _rounds(targets: dict[str, tuple[str, str]], load, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Each target under load (`connections`) and alone (1 connection: latency without queueing)."""
    results: dict[tuple[str, int], list[Figures]] = {}
    for _ in range(args.rounds):
        for conns in (args.connections, 1):
            for name, (url, token) in targets.items():
                results.setdefault((name, conns), []).append(await load(url, token, args.seconds, conns))
    return results


def _median(runs: list[Figures]) -> Figures:
    return Figures(*(statistics.median(getattr(r, f) for r in runs) for f in ("rps", "p50_ms", "p99_ms")))


def _report(results: dict[tuple[str, int], list[Figures]], generator: str, args: argparse.Namespace) -> None:
    med = {key: _median(runs) for key, runs in results.items()}
    print(f"load: {generator}, {args.seconds:g} s x {args.rounds} rounds (medians); sandbox and AMO_RATE_LIMIT "
          f"at {HIGH_RATE} rps so the limiter does not dominate; gateway logs at WARNING")
    print(f"{'target':<16} {'conns':>5} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
    for (name, conns), fig in sorted(med.items(), key=lambda kv: -kv[0][1]):
        print(f"{name:<16} {conns:>5} {fig.rps:>10.0f} {fig.p50_ms:>9.3f} {fig.p99_ms:>9.3f}")
    n = args.connections
    share = med[("GET /token", n)].rps / med[("bare handler", n)].rps
    overhead = med[("proxied", 1)].p50_ms - med[("direct sandbox", 1)].p50_ms
    print(f"/token throughput = {share:.0%} of the bare handler (target >= 70%): {'OK' if share >= 0.7 else 'MISS'}")
    verdict = 'OK' if overhead < 1 else 'MISS'
    print(f"proxy overhead at p50, 1 connection = {overhead:.3f} ms (target < 1 ms): {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--python-client", action="store_true", help="use the aiohttp load generator, not wrk")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
