"""Crash loop: SIGKILL the real gateway at random moments, restart it, and prove no token is ever lost.

Runs `amo-gateway serve` against the standalone sandbox with short-lived access tokens (refreshes are
constant). Each round picks a moment to kill: at random, while a vault write is under way (a temp file
exists), right after the sandbox received a refresh (its `token` route is delayed to widen the window, so
the request dies unprocessed), or right after the sandbox spent a refresh token and dropped the answer.
With the process dead, the state it left is judged:

- the vault decrypts (Vault + KeyRing);
- its refresh token is the one the sandbox accepts, or it is spent and marked in flight (the answer was
  lost) - anything else is "silently broken";
- it never returns to a refresh token seen before a newer one.

After the restart the gateway must come back connected, or - only when the answer was provably lost -
in `reauth_required` with a reason starting `refresh_answer_lost` (then the harness reconnects).

The gateway alerts to a webhook receiver run here (signatures checked): at the end, every lost pair must
have produced exactly one `refresh_answer_lost` alert (distinct alert ids; a kill in the middle of a
delivery may send one twice, counted as `redelivered`), and the outbox must be empty.
A kill moment counts under its kind only when it was actually reached (a moment that did not come in time
is a kill at an arbitrary moment, counted as `missed`); any exception of the run is a recorded failure.
Usage: python scripts/crashloop.py --kills 200 [--report out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _alerts_receiver import AlertReceiver
from _harness import Harness, fp, poll, report

MODES = ("random", "vault_write", "mid_refresh", "lost_answer")
WEIGHTS = (0.45, 0.25, 0.15, 0.15)
REFRESH_DELAY = 0.4  # the sandbox sits on a received refresh this long before reading it


class Failure(AssertionError):
    """An invariant broke; the message says which and in which round."""


class Ledger:
    """Figures of the run and the order in which refresh tokens appeared in the vault."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.modes: Counter[str] = Counter()
        self.kills = 0
        self.missed: Counter[str] = Counter()
        self.judged = 0
        self.decrypted = 0
        self.kills_mid_write = 0
        self.reconnects = 0
        self.seen: list[str] = []
        self.failures: list[str] = []

    def observe(self, refresh_fp: str, round_no: int) -> None:
        """Record the vault's refresh token; one seen earlier and then superseded must never come back."""
        if self.seen and self.seen[-1] == refresh_fp:
            return
        if refresh_fp in self.seen:
            raise Failure(f"round {round_no}: the vault went back to an older refresh token")
        self.seen.append(refresh_fp)


async def wait_for_kill_moment(h: Harness, mode: str, rng: random.Random) -> bool:
    """Sleep until the chosen kind of moment arrives (each bounded in time); False when it never came."""
    if mode == "mid_refresh":
        await h.faults(delay={"token": REFRESH_DELAY})
        before = (await h.stats())["hits"].get("token", 0)
        return await poll(lambda: _hits_past(h, before), 6)
    if mode == "lost_answer":
        await h.faults(drop_next_refresh=1)
        return await poll(lambda: _answer_dropped(h), 6)
    if mode == "vault_write":
        return await poll(lambda: _writing(h), 4, interval=0)  # as fast as the loop allows: a write takes ms
    await asyncio.sleep(rng.uniform(0.05, 1.6))  # a refresh falls due every ttl/2 = 1.5 s
    return True


async def _hits_past(h: Harness, before: int) -> bool:
    return int((await h.stats())["hits"].get("token", 0)) > before


async def _answer_dropped(h: Harness) -> bool:
    return not (await h.stats())["drop_next_refresh"]


async def _writing(h: Harness) -> bool:
    return bool(_temp_files(h))


def _temp_files(h: Harness) -> list[str]:
    """Temp files of a vault write in progress (or of one a kill interrupted)."""
    try:
        return [n for n in os.listdir(h.vault_path.parent) if ".tmp-" in n]
    except FileNotFoundError:
        return []


async def judge_frozen(h: Harness, ledger: Ledger, round_no: int) -> str:
    """With the gateway dead: the vault decrypts and holds the live token or the lost in-flight one."""
    ledger.judged += 1
    try:
        token, marker, status = h.vault_refresh()
    except Exception as err:
        raise Failure(f"round {round_no}: the vault does not decrypt after SIGKILL ({type(err).__name__})") from err
    ledger.decrypted += 1
    if token is None:
        raise Failure(f"round {round_no}: the vault lost the account's token pair")
    ledger.observe(fp(token), round_no)
    if await h.is_live(token):
        return "connected"
    if marker == fp(token) or status.startswith("reauth_required: refresh_answer_lost"):
        return "lost"  # spent by a refresh whose answer never got stored (or already judged so)
    raise Failure(f"round {round_no}: silently broken: the stored refresh token is dead and no refresh "
                  f"was in flight (status {status})")


async def settle(h: Harness, expected: str, limit: float = 12.0) -> tuple[str, str | None]:
    """Poll /token until the gateway says connected (200) or reauth_required (503).

    After a lost answer the stored access token may still be valid for a moment (amoCRM keeps an access token
    alive until it expires, whatever happens to its refresh token), so /token may rightly answer 200 until
    the restarted gateway has judged the spent refresh token; then only reauth_required settles it.
    """
    deadline = time.monotonic() + limit
    body: Any = None
    while time.monotonic() < deadline:
        status, body = await h.token()
        if status == 200 and expected != "lost":
            return "connected", None
        if status == 503 and isinstance(body, dict) and body.get("error") == "reauth_required":
            return "reauth_required", str(body.get("reason") or body.get("detail"))
        await asyncio.sleep(0.1)
    return ("connected", None) if status == 200 else ("unsettled", str(body))


async def check_running(h: Harness, round_no: int) -> None:
    """With the gateway frozen (SIGSTOP): its stored token is the live one, or the one it is refreshing."""
    proc = h.procs[0]
    proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(0.05)
        token, marker, _ = h.vault_refresh()
        if not (await h.is_live(token) or marker == fp(token)):
            raise Failure(f"round {round_no}: connected but the stored refresh token is dead (silently broken)")
    finally:
        proc.send_signal(signal.SIGCONT)


async def one_round(h: Harness, ledger: Ledger, rng: random.Random, round_no: int) -> None:
    """Kill at a chosen moment, judge the remains, restart, and judge the comeback."""
    mode = rng.choices(MODES, WEIGHTS)[0]
    reached = await wait_for_kill_moment(h, mode, rng)
    (ledger.modes if reached else ledger.missed)[mode] += 1
    await h.kill()
    ledger.kills += 1
    ledger.kills_mid_write += bool(_temp_files(h))
    if mode in ("mid_refresh", "lost_answer"):
        await asyncio.sleep(REFRESH_DELAY + 0.2)  # let the sandbox finish what the dead process sent
        await h.faults(clear=True)
    expected = await judge_frozen(h, ledger, round_no)
    await h.start()
    outcome, reason = await settle(h, expected)
    await judge_comeback(h, ledger, round_no, expected, outcome, reason)


async def judge_comeback(h: Harness, ledger: Ledger, round_no: int, expected: str, outcome: str,
                         reason: str | None) -> None:
    """Connected when the stored token was live; refresh_answer_lost only when the answer was lost."""
    if expected == "connected" and outcome == "connected":
        ledger.outcomes["connected"] += 1
        await check_running(h, round_no)
        return
    if expected == "lost" and outcome == "reauth_required" and (reason or "").startswith("refresh_answer_lost"):
        ledger.outcomes["reauth_refresh_answer_lost"] += 1
        await h.connect()
        ledger.reconnects += 1
        return
    raise Failure(f"round {round_no}: expected {expected}, the gateway came back {outcome} ({reason})")


async def run(kills: int, seed: int, access_ttl: int, workdir: Path, max_seconds: float) -> dict[str, Any]:
    """The whole loop; returns the figures (raises Failure on the first broken invariant)."""
    rng = random.Random(seed)  # chooses kill moments, not secrets
    ledger = Ledger()
    started = time.monotonic()
    stats: dict[str, Any] = {}
    final = "not reached"
    receiver = AlertReceiver()
    await receiver.start()
    async with Harness(workdir, access_ttl=access_ttl, extra_env=receiver.env()) as h:
        try:
            await h.start()
            await h.connect()
            for round_no in range(1, kills + 1):
                if time.monotonic() - started > max_seconds:
                    ledger.failures.append(f"time bound of {max_seconds} s reached after {ledger.kills} kills")
                    break
                await one_round(h, ledger, rng, round_no)
            stats = await h.stats()
            await receiver.drained(h.vault_path, limit=30)
            await h.stop()
            final = await judge_frozen(h, ledger, kills + 1)
        except Exception as err:  # an invariant broke, or the rig did: either way a recorded failure, not a crash
            ledger.failures.append(str(err) if isinstance(err, Failure) else f"{type(err).__name__}: {err}")
    await receiver.close()
    result = figures(ledger, stats, final, time.monotonic() - started, seed)
    result["alerts"] = alert_figures(receiver, h.vault_path, ledger, result["failures"])
    return result


def alert_figures(receiver: AlertReceiver, vault_path: Path, ledger: Ledger, failures: list[str]) -> dict[str, Any]:
    """Lost pairs against `refresh_answer_lost` alerts; a difference, a bad signature or a leftover is a failure."""
    lost = ledger.outcomes["reauth_refresh_answer_lost"]
    figures = receiver.figures(vault_path)
    figures["reauth_refresh_answer_lost_outcomes"] = lost
    if figures["refresh_answer_lost"] != lost:
        failures.append(f"{lost} lost pairs but {figures['refresh_answer_lost']} refresh_answer_lost alerts")
    if figures["bad_signatures"] or figures["pending_at_end"]:
        failures.append(f"alerts: {figures['bad_signatures']} bad signatures, {figures['pending_at_end']} undelivered")
    return figures


def figures(ledger: Ledger, stats: dict[str, Any], final: str, seconds: float, seed: int) -> dict[str, Any]:
    """What the run measured, as one JSON-able dict."""
    lost = ledger.outcomes["reauth_refresh_answer_lost"]
    reused = stats.get("refresh_tokens_reused")
    failures = list(ledger.failures)
    if reused is not None and reused > lost:
        failures.append(f"{reused} refresh tokens reused, only {lost} answers provably lost")
    return {
        "kills": ledger.kills, "modes": dict(ledger.modes), "missed_moments": dict(ledger.missed),
        "kills_mid_vault_write": ledger.kills_mid_write,
        "outcomes": dict(ledger.outcomes), "reconnects": ledger.reconnects,
        "refreshes_sent": stats.get("refresh_attempts"), "refresh_tokens_reused": reused,
        "reuse_explained_by_lost_answers": reused is not None and reused <= lost,
        "distinct_refresh_tokens_seen_in_vault": len(ledger.seen), "final_state": final,
        "vaults_judged": ledger.judged,
        "vault_always_decrypted": ledger.judged > 0 and ledger.decrypted == ledger.judged,
        "failures": failures, "seconds": round(seconds, 1), "seed": seed,
    }


def main() -> int:
    """Parse flags, run, print the figures (and write them as JSON when asked)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=200)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--access-ttl", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=None, help="hard bound on the run (default 5 s a kill)")
    p.add_argument("--report", type=Path, help="write the figures here as JSON")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    with tempfile.TemporaryDirectory(prefix="amo-crashloop-") as tmp:
        result = asyncio.run(run(args.kills, seed, args.access_ttl, Path(tmp),
                                 args.max_seconds or 5.0 * args.kills + 60))
    return report(result, args.report)


if __name__ == "__main__":
    sys.exit(main())
