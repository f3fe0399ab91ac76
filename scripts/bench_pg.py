"""Scale benchmark of the PostgreSQL backend: start-up, one account's update and RSS at many accounts, and the
refreshes per second the scheduler sustains in a storm against sandbox processes (pg_storm.py). A throwaway
server (tests/pg.py) on loopback.

Prints figures computed from the measurements; asserts nothing. Each size runs in a fresh subprocess so its RSS
is its own. `--full` is issue 13's evidence: 1 000 and 100 000 accounts, a storm of 10 000 due among 100 000.
Usage: python scripts/bench_pg.py [--full] [--sizes 1000,10000] [--updates 300] [--storm-due 2000]
       [--storm-accounts 10000] [--sandboxes 1] [--report FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amo_gateway.backends.postgres import PgStore  # noqa: E402 - after the checkout joins sys.path
from amo_gateway.manager import Outcome  # noqa: E402
from amo_gateway.tokens import TokenPair, VaultData  # noqa: E402
from amo_gateway.vault import KeyRing  # noqa: E402
from scripts import pg_storm  # noqa: E402
from scripts.bench_accounts import fake_vault, rss_kib  # noqa: E402
from tests.pg import ThrowawayPostgres, throwaway_postgres  # noqa: E402


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


def storm(server: ThrowawayPostgres, due: int, total: int, sandboxes: int, profile: Path | None) -> dict[str, Any]:
    """`due` accounts due among `total` stored, refreshed by the scheduler against sandbox processes (pg_storm.py);
    `profile`: the gateway process's cProfile statistics go there (it then runs slower)."""
    url, key, secret = server.database(), Fernet.generate_key().decode(), pg_storm.new_secret()
    if total > due:
        _child("--seed", url, key, str(total - due))  # the others, not due (fresh pairs)
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="amo-storm-") as tmp:
        try:
            shares = []
            for k in range(sandboxes):
                first, n = k * due // sandboxes, (k + 1) * due // sandboxes - k * due // sandboxes
                path = str(Path(tmp) / f"pairs{k}.json")
                argv = ["--sandbox", str(first), str(n), secret, path]
                procs.append(subprocess.Popen([sys.executable, "-m", "scripts.pg_storm", *argv], cwd=ROOT,
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
                assert procs[-1].stdout is not None
                shares.append((json.loads(procs[-1].stdout.readline())["port"], path))
            others = {"sandbox": [p.pid for p in procs], "postgres": [postmaster]}
            with (Path(tmp) / "gateway.log").open("w") as log:
                profiled = ["-m", "cProfile", "-o", str(profile)] if profile else []
                out = subprocess.run([sys.executable, *profiled, "-m", "scripts.pg_storm", "--gateway", url, key,
                                      secret, json.dumps(shares), json.dumps(others)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=log, text=True, check=True, timeout=1800)
            gateway = json.loads(out.stdout)
            for proc in procs:
                proc.communicate(timeout=300)  # stdin closed: each writes what it saw beside its pairs, and stops
            records = [json.loads((Path(path + ".seen")).read_text()) for _, path in shares]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    live = {k: v for r in records for k, v in r["live"].items()}
    refreshed = gateway["results"].get("refreshed", 0)
    return gateway | {"refreshed": refreshed, "refreshes_per_s": refreshed / gateway["seconds"],
                      "reused": sum(r["reused"] for r in records), "attempts": sum(r["attempts"] for r in records),
                      "stored_live": sum(live.get(a) == fp for a, fp in gateway.pop("stored").items()),
                      "sandboxes": sandboxes}


def _child(*argv: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True, timeout=3600)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _storm_line(r: dict[str, Any]) -> str:
    cpu = r["cpu_s"]
    return (f"refresh storm: {r['due']} due among {r['accounts']} accounts, {r['sandboxes']} sandbox process(es): "
            f"{r['refreshed']} refreshed in {r['seconds']:.2f} s = {r['refreshes_per_s']:.0f} refreshes/s "
            f"(claims {r.get('claim_s', 0):.2f} s, stores {r.get('store_s', 0):.2f} s, summed over the batches; "
            f"results {r['results']})\n"
            f"  CPU s during the storm: gateway {cpu['gateway']:.1f}, sandbox {cpu['sandbox']:.1f}, "
            f"postgres {cpu['postgres']:.1f} (of {os.cpu_count()} cores x {r['seconds']:.1f} s)\n"
            f"  refresh tokens reused: {r['reused']} (the sandbox saw {r['attempts']} refresh calls); stored pair is "
            f"the sandbox's live one for {r['stored_live']}/{r['due']} accounts; in-flight markers left: "
            f"{r['markers_left']}; gateway start-up over {r['accounts']} accounts {r['startup_s']:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="1 000 and 100 000 accounts; 10 000 due among 100 000")
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--storm-due", type=int, default=2000)
    parser.add_argument("--storm-accounts", type=int, default=10000)
    parser.add_argument("--sandboxes", type=int, default=1)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--profile", type=Path, help="cProfile the storm's gateway process into this file")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--seed", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed is not None:
        url, key, n = args.seed
        print(json.dumps(pg_storm.on_uvloop(seed(url, key, int(n)))))
        return 0
    if args.one is not None:
        url, key, n = args.one
        print(json.dumps(pg_storm.on_uvloop(one_size(url, key, int(n), args.updates))))
        return 0
    if args.full:
        args.sizes, args.storm_due, args.storm_accounts = "1000,100000", 10000, 100000
    report: dict[str, Any] = {"load_before": os.getloadavg(), "sizes": []}
    with throwaway_postgres() as server:
        if isinstance(server, str):
            print(server, file=sys.stderr)
            return 1
        print(f"load average before: {' '.join(f'{x:.2f}' for x in report['load_before'])} on {os.cpu_count()} cores")
        print(f"{'accounts':>9} {'seed s':>7} {'start-up s':>10} {'update p50/p99 ms':>18} "
              f"{'refresh steps p50/p99 ms':>25} {'RSS MiB':>8} {'RSS +MiB':>9}")
        for n in (int(s) for s in args.sizes.split(",") if s):
            where = [server.database(), Fernet.generate_key().decode(), str(n)]
            r = _child("--seed", *where) | _child("--one", *where, "--updates", str(args.updates))
            report["sizes"].append(r)
            print(f"{r['accounts']:>9} {r['seed_s']:>7.1f} {r['startup_s']:>10.2f} "
                  f"{r['update_p50_ms']:>8.2f} / {r['update_p99_ms']:<7.2f} "
                  f"{r['refresh_steps_p50_ms']:>12.2f} / {r['refresh_steps_p99_ms']:<10.2f} "
                  f"{r['rss_mib']:>8.1f} {r['rss_delta_mib']:>9.1f}", flush=True)
        if args.storm_due:
            report["storm"] = storm(server, args.storm_due, max(args.storm_accounts, args.storm_due), args.sandboxes,
                                    args.profile)
            print(_storm_line(report["storm"]))
    report["load_after"] = os.getloadavg()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in report['load_after'])}")
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
