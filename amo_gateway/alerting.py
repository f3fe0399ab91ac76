"""The alert service: turns what happens into durable alerts (outbox) and delivers them with backoff.

`check()` derives the conditions (alerts.py) from the vault, this process's breakers and the events its
observers heard, and reconciles them with the outbox's `active` record under the outbox lock: the alerts
are queued in the same write that records them as sent, so a crash either loses nothing or repeats nothing.
The outbox is an OutboxStore (backends/base.py): the file beside the vault, or PostgreSQL; this module does
not know which.
`deliver()` leases the due entries of each target, sends them in order, and records the result; a failure
waits a backoff with full jitter (capped at AMO_ALERT_RETRY_MAX) and holds back that target's later alerts,
so they arrive in the order they were raised. `run()` does both until stopped (a cleanup_ctx task in app.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from typing import Any

import aiohttp

from amo_gateway.alerts import (
    BREAKER,
    REAUTH,
    Condition,
    Event,
    Policy,
    healthy_in,
    payload,
    reconcile,
    vault_conditions,
)
from amo_gateway.backends.base import Active, OutboxStore, StateStore
from amo_gateway.breaker import CLOSED, OPEN
from amo_gateway.clock import Clock
from amo_gateway.logs import event
from amo_gateway.manager import Outcome
from amo_gateway.metrics import Metrics
from amo_gateway.settings import Settings
from amo_gateway.tokens import VaultData, backoff_delay
from amo_gateway.webhook import DeliveryFailed, Target

log = logging.getLogger("amo_gateway.alerts")
BATCH = 20  # deliveries leased per target per round
TICK = 1.0  # seconds between looks at the vault (its file signature) and the outbox
RETRY_BASE = 1.0


class AlertService:
    """One per process; any number of processes may share a vault and its outbox."""

    def __init__(self, settings: Settings, store: StateStore, outbox: OutboxStore, targets: list[Target], clock: Clock,
                 metrics: Metrics, session: aiohttp.ClientSession,
                 breaker_states: Callable[[], dict[str, str]] | None = None) -> None:
        self.settings, self.store, self.outbox, self.targets = settings, store, outbox, targets
        self.clock, self.metrics, self.session = clock, metrics, session
        self.breaker_states = breaker_states or dict
        self.policy = Policy(settings.alert_reminder_interval, breaker_stale_after=3 * settings.alert_check_interval)
        self._events: list[Event] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._owner = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._rng = random.Random()  # noqa: S311 - jitter only
        self._last_facts: object = None
        self._checked_at = float("-inf")

    # What the observers hear (sync, from the event loop).
    def observe_refresh(self, outcome: Outcome) -> None:
        """The token manager's observer: a re-authorization is an event even if it is fixed before the check."""
        account = outcome.account
        if outcome.result == "reauth" and account is not None:
            self._events.append(Event(Condition(REAUTH, account.account_id, account.subdomain,
                                                str(account.connected_at), outcome.reason or "refresh_rejected",
                                                self.clock.time())))
        if outcome.result in ("reauth", "refreshed"):
            self.poke()

    def breaker_changed(self, account_id: str, state: str) -> None:
        """The proxy breakers' listener: opened and closed are events."""
        if state == OPEN:
            condition = Condition(BREAKER, account_id, None, "", "breaker_opened: amoCRM answered 403",
                                  self.clock.time())
            self._events.append(Event(condition))
        elif state == CLOSED:
            self._events.append(Event(closed=f"{account_id}|{BREAKER}"))
        self.poke()

    def poke(self) -> None:
        """Check (and deliver) now rather than at the next tick."""
        self._wake.set()

    # One check.
    async def check(self, *, force: bool = True) -> list[dict[str, Any]]:
        """Reconcile now; returns the alerts queued. Without `force`, skipped while nothing can have changed."""
        data = await self.store.snapshot(recheck=True)
        now = self.clock.time()
        vault = vault_conditions(data, now, self.settings.alert_transient_after)
        local = self._local_breakers(data, now)
        facts = (sorted((k, c.episode) for k, c in vault.items()), sorted(local))
        due = now - self._checked_at >= self.settings.alert_check_interval
        if not (force or due or self._events or facts != self._last_facts):
            return []
        events, self._events = self._events, []
        try:
            queued = await self.outbox.record(lambda active: self._reconcile(active, events, vault, local, data, now),
                                              [t.name for t in self.targets], now, self.settings.alert_outbox_max)
        except BaseException:
            self._events[:0] = events  # not recorded: the next check tries them again
            raise
        self._last_facts, self._checked_at = facts, now
        for alert in queued:
            self.metrics.alerts_raised.labels(alert["event"]).inc()
            event(log, "alert.raised", level=logging.WARNING, alert_event=alert["event"], account=alert["account_id"],
                  reason=alert["reason_code"], reminder=alert["reminder"], alert_id=alert["id"])
        return queued

    def _local_breakers(self, data: VaultData, now: float) -> dict[str, Condition]:
        found = {}
        for account_id, state in self.breaker_states().items():
            if state != CLOSED:
                account = data.accounts.get(account_id)
                sub = account.subdomain if account else None
                found[f"{account_id}|{BREAKER}"] = Condition(BREAKER, account_id, sub, "",
                                                             "breaker_opened: amoCRM answered 403", now)
        return found

    def _reconcile(self, active: Active, events: list[Event], vault: dict[str, Condition],
                   local: dict[str, Condition], data: VaultData, now: float) -> list[dict[str, Any]]:
        """Inside the outbox lock: the alerts to queue (the outbox queues them in the same write)."""
        found = reconcile(active, events, vault, local, now, self.policy, healthy_in(data, now))
        return [payload(name, self._named(c, data), reminder, now, self.settings.alert_reconnect_url)
                for name, c, reminder in found]

    @staticmethod
    def _named(condition: Condition, data: VaultData) -> Condition:
        """Fill the subdomain from the vault when the event did not know it (a breaker)."""
        account = data.accounts.get(condition.account_id)
        if condition.subdomain is None and account is not None and account.subdomain:
            return Condition(condition.kind, condition.account_id, account.subdomain, condition.episode,
                             condition.reason, condition.since)
        return condition

    # Delivery.
    async def deliver(self) -> int:
        """Send what is due to every target, in order; returns how many were delivered."""
        delivered = 0
        for target in self.targets:
            delivered += await self._deliver_to(target)
        return delivered

    async def _deliver_to(self, target: Target) -> int:
        now = self.clock.time()
        lease_until = now + self.settings.alert_timeout + 5.0
        batch = await self.outbox.claim(target.name, now, lease_until, self._owner, BATCH)
        for index, entry in enumerate(batch):
            if not await self._send_one(target, entry):
                await self._release(target.name, batch[index + 1:])
                return index
        return len(batch)

    async def _send_one(self, target: Target, entry: dict[str, Any]) -> bool:
        alert, name = entry["payload"], target.name
        try:
            await asyncio.wait_for(target.send(self.session, alert), self.settings.alert_timeout)
        except (DeliveryFailed, TimeoutError) as err:
            why = err.why if isinstance(err, DeliveryFailed) else "timeout"
            wait = RETRY_BASE + backoff_delay(entry["attempts"], base=RETRY_BASE, cap=self.settings.alert_retry_max,
                                              rng=self._rng)
            retry_at = self.clock.time() + wait
            await self.outbox.failed(entry["id"], name, retry_at, why)
            self.metrics.alert_deliveries.labels(name, "failed").inc()
            event(log, "alert.delivery_failed", level=logging.WARNING, target=name, alert_id=entry["id"],
                  alert_event=alert["event"], account=alert["account_id"], why=why,
                  attempt=entry["attempts"] + 1, retry_in=round(wait, 1))
            return False
        now = self.clock.time()
        await self.outbox.delivered(entry["id"], name, now)
        self.metrics.alert_deliveries.labels(name, "delivered").inc()
        event(log, "alert.delivered", target=name, alert_id=entry["id"], alert_event=alert["event"],
              account=alert["account_id"], attempts=entry["attempts"] + 1)
        return True

    async def _release(self, target: str, rest: list[dict[str, Any]]) -> None:
        """Give back the leases behind a failed delivery, untried (they keep their place in line)."""
        await self.outbox.release(target, [entry["id"] for entry in rest], self._owner)

    # The loop.
    async def run(self) -> None:
        """Until stopped: check when something may have changed, deliver what is due, sleep a tick."""
        while not self._stopping:
            try:
                await self.check(force=False)
                await self.deliver()
            except Exception as err:  # the alert loop must outlive a bad round (disk full, a malformed file)
                event(log, "alerts.error", level=logging.ERROR, error=type(err).__name__)
            if not self._stopping:
                await self._sleep(TICK)

    def stop(self) -> None:
        """Leave `run` after the delivery in progress (a cut one would be sent again after its lease)."""
        self._stopping = True
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    async def history(self, account_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The alerts sent (for one account, or all), newest first, each with its targets' delivery state."""
        return await self.outbox.history(account_id, limit)

    async def outbox_counts(self) -> tuple[int, int]:
        """(pending deliveries, deliveries dropped for the size bound), for the metrics."""
        return await self.outbox.counts()
