"""Three gateway replicas on one PostgreSQL: kill -9 and restart them, restart the database, burst the proxy.

`kill-restart`: three real `amo-gateway serve` processes share one throwaway PostgreSQL (tests/pg.py: a
private temp directory, a free port on 127.0.0.1, removed at the end) and the standalone sandbox issuing
3-second access tokens. Pollers GET /token on every replica every 50-100 ms. Every few seconds (seeded,
the seed printed) a random ready replica gets SIGKILL and is started again; once, half-way, the database is
stopped (`pg_ctl -m fast`), kept down `--db-down` seconds (0: a plain restart) and started again on the same
port and data directory. Kills pause for the database restart (a replica cannot start without its database),
which begins once all three replicas are ready. The run fails when:

- the sandbox saw any refresh token presented twice (its own record, /_sandbox/arrivals);
- /token on a ready replica answered anything but 200 outside the database-restart window;
- a 200 carried an access token already expired when asked for (its `exp`, the sandbox's own claim);
- at the end a replica is not ready, or the account is not connected on the sandbox's live refresh token.

The database-restart window runs from the moment `pg_ctl stop` is called until a new connection to the
database succeeds, plus GRACE = 2 s: a call that began just before may still sit in one of the gateway's
bounded 2 s waits for a pooled connection. A call overlapping the window counts in it. Inside it /token may
rightly answer 200 from the token held in memory (with a `Warning: 199` header once the replica has noticed
the database is away), or 503 `state_unavailable` once that token has expired; all are counted, none fails.
A replica is judged from its first `/readyz` 200 after a (re)start until it is killed; calls made before
that count as `starting`, calls a kill cut short as `killed`.

`budget`: the three replicas proxy a burst at one account at once (`--calls` concurrent calls each through
/proxy/api/v4/account); the sandbox's arrival times of that account's requests must never put more than 7
in any one-second span, and every replica's callers must all get 200.

Usage: python scripts/replicas.py [--scenario kill-restart|budget|both] [--seconds 180] [--db-down 5]
                                  [--seed N] [--calls 40] [--report out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from _harness import report
from _replicas_rig import REPLICAS, Rig, accepts, arrivals, budget, jwt_exp, rounded, spread, stored_pair

from tests.pg import ThrowawayPostgres, _bindir

GRACE = 2.0  # seconds after the database accepts connections again that still count as its restart window
POLL_PAUSE = (0.05, 0.1)  # seconds between one poller's /token calls
POLLERS_PER_REPLICA = 2
TOKEN_TIMEOUT = aiohttp.ClientTimeout(total=20)  # longer than a dead holder's lease (3 x 1 s + 5 s)


@dataclass
class Replica:
    """What the pollers need to judge an answer: is this replica up, ready, and in which life."""

    life: int = 0
    ready: bool = False
    up: bool = False


@dataclass
class Run:
    """Everything measured during kill-restart."""

    replicas: list[Replica] = field(default_factory=lambda: [Replica() for _ in range(REPLICAS)])
    answers: Counter[str] = field(default_factory=Counter)  # "phase status[+warning]"
    ok_times: list[float] = field(default_factory=list)  # monotonic receipt times of 200s
    kills: list[float] = field(default_factory=list)  # wall times
    restarts: int = 0
    ready_after_kill: list[float] = field(default_factory=list)
    db_window: list[float] = field(default_factory=list)  # [stop called, accepting again] (monotonic)
    db_recovered_after: float | None = None
    min_headroom: float | None = None  # least seconds of life left on a served token at its receipt
    slowest: dict[str, float] = field(default_factory=dict)  # phase -> longest /token call
    failures: list[str] = field(default_factory=list)

    def in_db_window(self, sent: float, received: float) -> bool:
        """Whether the call overlapped [stop, accepting + GRACE] (an open window runs on)."""
        if not self.db_window:
            return False
        end = self.db_window[1] + GRACE if len(self.db_window) == 2 else float("inf")
        return sent < end and received > self.db_window[0]


async def poller(h: Rig, run: Run, index: int, until: float, rng: random.Random) -> None:
    """GET /token on one replica until the deadline; classify and judge every answer."""
    assert h.session is not None
    replica = run.replicas[index]
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(*POLL_PAUSE))
        if not replica.up:
            continue
        life, ready, sent, wall_sent = replica.life, replica.ready, time.monotonic(), time.time()
        status, warning, exp = "error", False, None
        try:
            async with h.session.get(h.url(index, "/token"), headers=h.admin, timeout=TOKEN_TIMEOUT) as resp:
                body = await resp.json(content_type=None)
                status, warning = str(resp.status), "Warning" in resp.headers
                if resp.status == 200:
                    exp = jwt_exp(body["access_token"])
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as err:
            status = f"error:{type(err).__name__}"
        judge(run, index, life, ready, (sent, wall_sent, time.monotonic(), time.time()), status, warning, exp)


def judge(run: Run, index: int, life: int, ready: bool, times: tuple[float, float, float, float], status: str,
          warning: bool, exp: float | None) -> None:
    """Count one answer under its phase; a non-200 in the steady phase or an expired token is a failure."""
    sent, wall_sent, received, wall_received = times
    if run.replicas[index].life != life:
        phase = "killed"  # the process answering (or not) was killed while the call was under way
    elif not ready:
        phase = "starting"
    elif run.in_db_window(sent, received):
        phase = "db_restart"
    else:
        phase = "steady"
    run.answers[f"{phase} {status}{' +warning' if warning else ''}"] += 1
    run.slowest[phase] = max(run.slowest.get(phase, 0.0), received - sent)
    if status == "200":
        run.ok_times.append(received)
        assert exp is not None
        headroom = exp - wall_received
        run.min_headroom = headroom if run.min_headroom is None else min(run.min_headroom, headroom)
        if exp <= wall_sent:
            run.failures.append(f"replica {index} served an access token expired {wall_sent - exp:.2f} s before "
                                f"it was asked for ({phase})")
    elif phase == "steady":
        run.failures.append(f"replica {index} answered /token with {status} outside the database restart "
                            f"(t={sent - run.db_window[0] if run.db_window else 0:+.2f} s from the stop)")


async def kill_one(h: Rig, run: Run, index: int) -> None:
    """SIGKILL one replica, start it again at once, and wait until it is ready."""
    replica = run.replicas[index]
    replica.ready, replica.up = False, False
    replica.life += 1
    killed = time.monotonic()
    await h.kill(index)
    run.kills.append(time.time())
    await h.start(index)
    run.restarts += 1
    replica.up = True
    await h.until_ready(index)
    replica.ready = True
    run.ready_after_kill.append(time.monotonic() - killed)


async def restart_database(h: Rig, run: Run, pg: ThrowawayPostgres, url: str, down: float) -> None:
    """Stop the database fast, keep it down `down` seconds, start it on the same port and data directory."""
    for index in range(REPLICAS):  # a replica starting while the database is away would refuse to start
        await h.until_ready(index)
    run.db_window = [time.monotonic()]
    await asyncio.to_thread(pg.stop, "fast")
    await asyncio.sleep(down)
    await asyncio.to_thread(pg.start)
    while not await asyncio.to_thread(accepts, url):  # noqa: ASYNC110 - another process: nothing to wait on
        await asyncio.sleep(0.02)
    run.db_window.append(time.monotonic())
    readiness = await asyncio.gather(*(h.until_ready(i) for i in range(REPLICAS)))
    run.db_recovered_after = max(readiness)


async def chaos(h: Rig, run: Run, pg: ThrowawayPostgres, url: str, until: float, rng: random.Random,
                kill_every: tuple[float, float], db_down: float) -> None:
    """Kill and restart replicas every few seconds; restart the database once, half-way."""
    half = time.monotonic() + (until - time.monotonic()) / 2
    while True:
        await asyncio.sleep(rng.uniform(*kill_every))
        if time.monotonic() >= until - 1:
            return
        if not run.db_window and time.monotonic() >= half:
            await restart_database(h, run, pg, url, db_down)
            continue
        await kill_one(h, run, rng.randrange(REPLICAS))


async def final_checks(h: Rig, run: Run, url: str) -> dict[str, Any]:
    """Every replica ready and answering 200; the database holds the sandbox's live refresh token."""
    ends = []
    for index in range(REPLICAS):
        try:
            await h.until_ready(index, limit=15)
        except RuntimeError as err:
            run.failures.append(str(err))
        ends.append((await h.token(index))[0])
    run.failures.extend(f"replica {i} ended with /token {s}" for i, s in enumerate(ends) if s != 200)
    status, live = await stored_pair(h, url)
    if status != "connected" or not live:
        run.failures.append(f"the account ended {status}, its stored refresh token "
                            f"{'live' if live else 'not the live one'}")
    return {"final_token_status_per_replica": ends, "account_status": status, "stored_refresh_token_live": live}


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest span between `start` and `end` with no 200 from any replica."""
    marks = [start, *sorted(t for t in times if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(marks))


def longest_gap_outside(run: Run, start: float, end: float) -> float:
    """The same, before the database stopped and after its window closed (GRACE included)."""
    if len(run.db_window) < 2:
        return longest_gap(run.ok_times, start, end)
    return max(longest_gap(run.ok_times, start, run.db_window[0]),
               longest_gap(run.ok_times, run.db_window[1] + GRACE, end))


async def kill_restart(h: Rig, pg: ThrowawayPostgres, url: str, seconds: float, seed: int,
                       kill_every: tuple[float, float], db_down: float) -> dict[str, Any]:
    """Scenario A on a running, connected rig; its figures."""
    rng = random.Random(seed)  # chooses moments and victims, not secrets
    run = Run()
    for replica in run.replicas:
        replica.up = replica.ready = True
    before = await arrivals(h)
    started = time.monotonic()
    until = started + seconds
    pollers = [poller(h, run, i, until, random.Random(rng.random())) for i in range(REPLICAS)
               for _ in range(POLLERS_PER_REPLICA)]
    await asyncio.gather(chaos(h, run, pg, url, until, rng, kill_every, db_down), *pollers)
    ended = min(time.monotonic(), until)  # the pollers stop at `until`; a last restart may run past it
    end_state = await final_checks(h, run, url)
    refreshes = (await arrivals(h))["refreshes"][len(before["refreshes"]):]
    reused = [at for at, presented in refreshes if presented > 1]
    if reused:
        run.failures.append(f"{len(reused)} refresh tokens presented again (the sandbox's record)")
    if not run.db_window or len(run.db_window) < 2:
        run.failures.append("the database was never restarted")
    by_phase: dict[str, dict[str, int]] = {}
    for key, n in sorted(run.answers.items()):
        phase, status = key.split(" ", 1)
        by_phase.setdefault(phase, {})[status] = n
    by_status = Counter(key.split(" ", 1)[1].split(" ")[0] for key in run.answers.elements())
    db = run.db_window
    return {
        "seed": seed, "seconds": round(ended - started, 1), "replicas": REPLICAS, "access_ttl": h.access_ttl,
        "kills": len(run.kills), "restarts": run.restarts, "database_restarts": int(len(db) == 2),
        "refreshes_seen_by_sandbox": len(refreshes), "refresh_tokens_reused": len(reused),
        "reuse_seconds_after_last_kill": [round(at - max([k for k in run.kills if k <= at], default=at), 3)
                                          for at in reused],
        "token_answers_by_status": dict(by_status), "token_answers_by_phase": by_phase,
        "longest_gap_without_200_s": round(longest_gap(run.ok_times, started, ended), 3),
        "longest_gap_without_200_outside_db_window_s": round(longest_gap_outside(run, started, ended), 3),
        "slowest_token_answer_by_phase_s": {k: round(v, 3) for k, v in sorted(run.slowest.items())},
        "killed_replica_ready_again_s": spread(run.ready_after_kill),
        "database_window_s": {"held_down": db_down,
                              "stop_to_accepting": round(db[1] - db[0], 3) if len(db) == 2 else None,
                              "grace": GRACE, "all_replicas_ready_after_s": rounded(run.db_recovered_after)},
        "least_token_life_left_at_receipt_s": rounded(run.min_headroom),
        **end_state,
        "failures": run.failures,
    }


async def main_async(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One database, one sandbox, three replicas; the chosen scenarios in turn."""
    bindir = _bindir()
    if bindir is None:
        return {"failures": ["PostgreSQL server binaries not found (make postgresql-available installs them)"]}
    pg = ThrowawayPostgres(bindir)
    result: dict[str, Any] = {"failures": []}
    try:
        await asyncio.to_thread(pg.init)
        url = await asyncio.to_thread(pg.database)
        async with Rig(workdir, url, access_ttl=args.access_ttl) as h:
            await asyncio.gather(*(h.start(i) for i in range(REPLICAS)))
            await h.connect(0)
            await asyncio.gather(*(h.until_ready(i) for i in range(REPLICAS)))
            if args.scenario in ("kill-restart", "both"):
                result["kill_restart"] = await kill_restart(h, pg, url, args.seconds, args.seed,
                                                            tuple(args.kill_every), args.db_down)  # type: ignore[arg-type]
            if args.scenario in ("budget", "both"):
                result["budget"] = await budget(h, args.calls)
    finally:
        await asyncio.to_thread(pg.destroy)
    for name in ("kill_restart", "budget"):
        result["failures"] += [f"{name}: {f}" for f in result.get(name, {}).get("failures", [])]
    return result


def main() -> int:
    """Parse flags, run, print the figures (and write them as JSON when asked)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=("kill-restart", "budget", "both"), default="both")
    p.add_argument("--seconds", type=float, default=180, help="length of kill-restart")
    p.add_argument("--seed", type=int, default=None, help="replay a run (printed at the start)")
    p.add_argument("--kill-every", type=float, nargs=2, default=(3.0, 6.0), metavar=("MIN", "MAX"),
                   help="seconds between kills, drawn uniformly")
    p.add_argument("--db-down", type=float, default=0.0,
                   help="seconds the database stays stopped before it is started again")
    p.add_argument("--access-ttl", type=int, default=3)
    p.add_argument("--calls", type=int, default=40, help="concurrent proxied calls per replica in budget")
    p.add_argument("--report", type=Path, help="write the figures here as JSON")
    p.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir removed at the end)")
    args = p.parse_args()
    if args.seed is None:
        args.seed = secrets.randbelow(2**32)
    print(f"seed: {args.seed} (replay with --seed {args.seed})", flush=True)
    if args.workdir is not None:
        result = asyncio.run(main_async(args, args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="amo-replicas-") as tmp:
            result = asyncio.run(main_async(args, Path(tmp)))
    return report(result, args.report)


if __name__ == "__main__":
    sys.exit(main())
