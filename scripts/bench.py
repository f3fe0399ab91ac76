"""Benchmark (not a test): GET /token vs a bare aiohttp handler, and a proxied call vs the same call direct.

Everything is a separate process on loopback: the standalone sandbox, `amo-gateway serve`, a bare aiohttp
server returning a constant, and the load generator (`wrk` when installed, else an aiohttp client with N
workers in this process). Each target runs `--seconds` per round, rounds interleaved; medians are printed.
For the proxy comparison the sandbox's rate limit and the gateway's AMO_RATE_LIMIT are set very high so the
7 rps limiter does not dominate. Everything else is the gateway's default configuration: logs at INFO with the
access log on (one line per request, to a file here as to the journal under systemd); the bare server logs nothing.
The gateway runs on uvloop (serve.run) and so does the bare server; the standalone sandbox, amoCRM's stand-in,
runs on asyncio's own loop. "CPU us/req" is the user + system CPU of the serving processes per request (for
"proxied", gateway plus sandbox), read from /proc: it moves far less with the machine's load than req/s does.
`--pin CPU` pins the bare server, the gateway and the sandbox to that CPU (taskset) and wrk to the others.

The ratios are computed per round (the targets of one round ran back to back) and printed as the median with
the spread across rounds, which says how noisy the machine was.

    .venv/bin/python scripts/bench.py [--seconds 3] [--rounds 5] [--connections 32] [--pin CPU] [--bare-loop asyncio]
                                       [--python-client]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import API_KEY, LOGIN, ROOT, Harness, _terminate, free_port

HIGH_RATE = "1000000"
# On the gateway's own event loop (uvloop, serve.run), so that the ratio measures the gateway, not the loop.
BARE_SERVER = """
import asyncio
import sys
import uvloop
from aiohttp import web
async def const(request):
    return web.json_response({"status": "ok"})
app = web.Application()
app.router.add_get("/const", const)
loop = uvloop.new_event_loop() if sys.argv[2] == "uvloop" else asyncio.new_event_loop()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, loop=loop)
"""


@dataclass
class Figures:
    """One run against one target."""

    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float = 0.0  # CPU (user + system) of the serving processes per request: less noisy than req/s


@dataclass(frozen=True)
class Ratio:
    """A target figure the issue sets, computed from one round's measurements."""

    label: str
    target: str
    ok: Callable[[float], bool]
    of: Callable[[dict[tuple[str, int], Figures], int], float]
    unit: str = "x"


RATIOS = (
    Ratio("/token throughput / bare handler, 32 conns", ">= 0.70x", lambda r: r >= 0.70,
          lambda f, n: f[("GET /token", n)].rps / f[("bare handler", n)].rps),
    Ratio("proxy overhead at p50, 1 conn (proxied - direct)", "< 1 ms", lambda r: r < 1.0,
          lambda f, n: f[("proxied", 1)].p50_ms - f[("direct sandbox", 1)].p50_ms, unit=" ms"),
    Ratio("proxied throughput / direct sandbox, 32 conns", ">= 0.80x", lambda r: r >= 0.80,
          lambda f, n: f[("proxied", n)].rps / f[("direct sandbox", n)].rps),
)

Load = Callable[[str, str, float, int], Awaitable[Figures]]


class BenchHarness(Harness):
    """The evidence harness with the sandbox's own rate limit out of the way and the gateway's default logs."""

    def env(self, index: int) -> dict[str, str]:
        env = super().env(index)
        env.pop("AMO_LOG_LEVEL", None)  # the harness quiets gateways to WARNING; the bench measures the default
        return env

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


def wrk_load(prefix: list[str]) -> Load:
    """A wrk run (1 thread: the machine has few cores and the servers need them), behind `prefix` (taskset)."""

    async def run(url: str, token: str, seconds: float, connections: int) -> Figures:
        proc = await asyncio.create_subprocess_exec(
            *prefix, "wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency",
            "-H", f"Authorization: Bearer {token}", url, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 30)
        text = out.decode()
        if re.search(r"Non-2xx or 3xx responses: (\d+)", text):
            raise RuntimeError(f"{url} answered errors under load:\n{text}")
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
        return Figures(rps, _wrk_ms(text, "50%"), _wrk_ms(text, "99%"))

    return run


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


async def pin(pid: int | None, cpu: int | None) -> None:
    """Pin every thread of a running process to `cpu` (no-op without --pin)."""
    if cpu is None or pid is None:
        return
    proc = await asyncio.create_subprocess_exec("taskset", "-a", "-p", "-c", str(cpu), str(pid),
                                                stdout=asyncio.subprocess.DEVNULL)
    if await proc.wait() != 0:
        raise RuntimeError(f"taskset could not pin {pid} to CPU {cpu}")


def wrk_prefix(cpu: int | None) -> list[str]:
    """wrk runs on every CPU but the servers' one."""
    if cpu is None:
        return []
    others = sorted(os.sched_getaffinity(0) - {cpu})
    if not others:
        raise SystemExit(f"--pin {cpu}: no CPU left for wrk")
    return ["taskset", "-c", ",".join(map(str, others))]


async def run(args: argparse.Namespace) -> int:
    use_wrk = shutil.which("wrk") is not None and not args.python_client
    load = wrk_load(wrk_prefix(args.pin)) if use_wrk else python_load
    args.load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    with tempfile.TemporaryDirectory(prefix="amo-bench-") as tmp:
        harness = BenchHarness(Path(tmp), access_ttl=86400,
                               extra_env={"AMO_RATE_LIMIT": HIGH_RATE, "AMO_PROXY_QUEUE": "100000"})
        async with harness:
            bare_port = free_port()
            bare = await asyncio.create_subprocess_exec(sys.executable, "-c", BARE_SERVER, str(bare_port),
                                                        args.bare_loop)
            try:
                gateway = await harness.start()
                await harness.connect()
                await harness._wait_http(f"http://127.0.0.1:{bare_port}/const", proc=bare)
                for proc in (bare, gateway, harness.sandbox):
                    await pin(proc.pid if proc else None, args.pin)
                targets = await _targets(harness, bare_port)
                assert harness.sandbox is not None
                servers = {"bare handler": [bare.pid], "GET /token": [gateway.pid],
                           "direct sandbox": [harness.sandbox.pid], "proxied": [gateway.pid, harness.sandbox.pid]}
                rounds = await _rounds(targets, servers, load, args)
                logged = _access_lines(Path(tmp) / "gateway-0.log")
            finally:
                await _terminate(bare)
    args.load_after = os.getloadavg()[0]
    _report(rounds, "wrk" if use_wrk else "python aiohttp client", logged, args)
    return 0


def _access_lines(path: Path) -> int:
    """How many access-log lines the gateway wrote: proof the bench measured it with the access log on."""
    with path.open("rb") as log:
        return sum(1 for line in log if b"http.access" in line)


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


Round = dict[tuple[str, int], Figures]


async def _rounds(targets: dict[str, tuple[str, str]], servers: dict[str, list[int]], load: Load,
                  args: argparse.Namespace) -> list[Round]:
    """Each target under load (`connections`) and alone (1 connection: latency without queueing), interleaved."""
    rounds: list[Round] = []
    for _ in range(args.rounds):
        figures: Round = {}
        for conns in (args.connections, 1):
            for name, (url, token) in targets.items():
                before = _cpu_seconds(servers[name])
                fig = await load(url, token, args.seconds, conns)
                fig.cpu_us = (_cpu_seconds(servers[name]) - before) / (fig.rps * args.seconds) * 1e6
                figures[(name, conns)] = fig
        rounds.append(figures)
    return rounds


def _cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes so far, from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


def _median(runs: list[Figures]) -> Figures:
    return Figures(*(statistics.median(getattr(r, f) for r in runs) for f in ("rps", "p50_ms", "p99_ms", "cpu_us")))


def _report(rounds: list[Round], generator: str, logged: int, args: argparse.Namespace) -> None:
    med = {key: _median([r[key] for r in rounds]) for key in rounds[0]}
    pinned = f"servers pinned to CPU {args.pin}, wrk to the others" if args.pin is not None else "unpinned"
    pinned += f", bare server on {args.bare_loop}"
    print(f"load: {generator}, {args.seconds:g} s x {args.rounds} interleaved rounds (medians), {pinned}; "
          f"sandbox and AMO_RATE_LIMIT at {HIGH_RATE} rps so the limiter does not dominate; gateway at its default "
          f"log level with the access log on ({logged} access lines written); CPU us/req: serving processes "
          f"(proxied: gateway + sandbox); load average {args.load_before:.1f} before, {args.load_after:.1f} after "
          f"on {os.cpu_count()} CPUs")
    print(f"{'target':<16} {'conns':>5} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'CPU us/req':>11}")
    for (name, conns), fig in sorted(med.items(), key=lambda kv: -kv[0][1]):
        print(f"{name:<16} {conns:>5} {fig.rps:>10.0f} {fig.p50_ms:>9.3f} {fig.p99_ms:>9.3f} {fig.cpu_us:>11.0f}")
    for ratio in RATIOS:
        per_round = [ratio.of(r, args.connections) for r in rounds]
        value = statistics.median(per_round)
        print(f"{ratio.label} = {value:.3f}{ratio.unit} (target {ratio.target}): {'OK' if ratio.ok(value) else 'MISS'}"
              f"; rounds {min(per_round):.3f}..{max(per_round):.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=3, help="per run (whole seconds: wrk takes no fraction)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--pin", type=int, default=None, metavar="CPU",
                        help="pin the servers to this CPU and wrk to the others (taskset)")
    parser.add_argument("--python-client", action="store_true", help="use the aiohttp load generator, not wrk")
    parser.add_argument("--bare-loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="the bare server's event loop (asyncio: to measure a gateway from before serve.run)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
