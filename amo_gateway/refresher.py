"""The background refresher: one task for all accounts, sleeping until the next pair falls due."""

from __future__ import annotations

import asyncio
import logging
import random

from amo_gateway.clock import Clock
from amo_gateway.logs import event
from amo_gateway.manager import Outcome, TokenManager
from amo_gateway.tokens import VaultData, account_due_at, backoff_delay

log = logging.getLogger("amo_gateway.refresh")
ERROR_PAUSE = 30.0
WATCH = 1.0  # seconds between looks at the shared state while asleep: another process's write re-plans
MIN_SLEEP = 0.05  # the shortest pause between rounds: a round that finds work due never spins
LONG_LIVED_WARNING = 14 * 86400  # two weeks' notice to mint a new long-lived token


def plan(data: VaultData, now: float, margin: float, retry_at: dict[str, float]) -> tuple[list[str], float | None]:
    """Pure: the accounts due now, and when the next one falls due (None: nothing to watch)."""
    due: list[str] = []
    next_at: float | None = None
    for account_id, account in data.accounts.items():
        when = account_due_at(account, margin)
        if when is None:
            continue
        when = max(when, retry_at.get(account_id, when))
        if when <= now:
            due.append(account_id)
        elif next_at is None or when < next_at:
            next_at = when
    return due, next_at


class Refresher:
    """Refreshes every account ahead of expiry with no traffic needed; transient failures back off."""

    def __init__(
        self,
        manager: TokenManager,
        clock: Clock,
        *,
        margin: float,
        recheck: float = 60.0,
        watch: float = WATCH,
        rng: random.Random | None = None,
    ) -> None:
        self.manager = manager
        self.clock = clock
        self.margin = margin
        self.recheck = recheck
        self.watch = watch
        self._rng = rng or random.Random()  # noqa: S311 - jitter only
        self._retry_at: dict[str, float] = {}
        self._attempts: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._warned: dict[str, float] = {}

    def wake(self) -> None:
        """Re-plan now (a new pair was stored, an account was added or removed)."""
        self._wake.set()

    def stop(self) -> None:
        """Finish the refreshes in progress, then leave `run` (never cut one between send and store)."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Until stopped: plan, refresh what is due, sleep until the next due time or a wake-up."""
        while not self._stopping:
            try:
                delay = await self._round()
            except Exception as err:  # the refresher must outlive any one bad round (vault rotated, disk full…)
                event(log, "refresher.error", level=logging.ERROR, error=type(err).__name__,
                      detail=getattr(err, "detail", "see the traceback"), retry_in=ERROR_PAUSE)
                delay = ERROR_PAUSE
            if not self._stopping:
                await self._sleep(delay)

    async def _round(self) -> float:
        """One round: refresh what is due, watch long-lived tokens; return how long to sleep."""
        await self.tick()
        data = await self.manager.store.snapshot(recheck=True)  # what the plan and the change watch start from
        self.watch_long_lived(data)
        due, next_at = plan(data, self.clock.time(), self.margin, self._retry_at)
        if due:  # fell due since the tick (a sleep ends a hair early by the loop's clock): go round again now
            return MIN_SLEEP
        delay = self.recheck if next_at is None else min(next_at - self.clock.time(), self.recheck)
        return max(delay, MIN_SLEEP)

    def watch_long_lived(self, data: VaultData) -> list[str]:
        """Warn (at most hourly per account) when a long-lived token, which nobody refreshes, nears expiry."""
        now = self.clock.time()
        warned = []
        for account_id, account in data.accounts.items():
            if not account.long_lived or account.tokens is None:
                continue
            left = account.tokens.expires_at - now
            if left < LONG_LIVED_WARNING and now - self._warned.get(account_id, -1e18) >= 3600:
                self._warned[account_id] = now
                warned.append(account_id)
                event(log, "token.long_lived_expiring", level=logging.WARNING, account=account_id,
                      expires_in_days=round(left / 86400, 2))
        return warned

    async def tick(self) -> list[Outcome]:
        """Refresh every account that is due now (bounded concurrency); returns what happened."""
        data = await self.manager.store.snapshot()
        now = self.clock.time()
        due, _ = plan(data, now, self.margin, self._retry_at)
        outcomes = await self.manager.refresh_due(due) if due else []
        for outcome in outcomes:
            self._note(outcome, now)
        return outcomes

    def _note(self, outcome: Outcome, now: float) -> None:
        account_id = outcome.account_id
        if outcome.result == "transient":
            attempt = self._attempts.get(account_id, 0)
            self._attempts[account_id] = attempt + 1
            wait = 1.0 + backoff_delay(attempt, rng=self._rng)
            if outcome.error is not None and outcome.error.retry_after:
                wait = max(wait, float(outcome.error.retry_after))
            self._retry_at[account_id] = now + wait
            event(log, "refresh.retry_scheduled", account=account_id, attempt=attempt + 1, in_seconds=round(wait, 1))
        elif outcome.result == "skipped":
            self._retry_at[account_id] = now + 1.0  # someone else holds it; look again shortly
        else:
            self._retry_at.pop(account_id, None)
            self._attempts.pop(account_id, None)

    async def _sleep(self, seconds: float) -> None:
        """Until the next due time, a wake-up, or a change of the vault file by anyone (another process)."""
        waker = asyncio.ensure_future(self._wake.wait())
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        watcher = asyncio.ensure_future(self._vault_changes())
        try:
            await asyncio.wait({waker, sleeper, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waker, sleeper, watcher):
                task.cancel()
            self._wake.clear()

    async def _vault_changes(self) -> None:
        """Return once another process or replica changed the shared state (the store says how it watches).

        Without this, one that slept through another's connect would wait a whole `recheck` to plan.
        """
        await self.manager.store.wait_for_change(self.watch)
