"""Circuit breaker per amoCRM account: a 403 (amoCRM's account ban) stops all calls until a cool-down passes.

closed ──403──▶ open ──cool-down──▶ half-open (one probe) ──2xx/3xx/4xx≠403──▶ closed
                  ▲                                  └──403──────────────────────┘
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from amo_gateway.errors import AmoBanned
from amo_gateway.logs import event

log = logging.getLogger("amo_gateway.proxy")

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
Listener = Callable[[str, str], None]  # (account id, OPEN or CLOSED): told when a breaker opens or closes


class Breaker:
    """One account's breaker; `clock` is wall or monotonic seconds."""

    def __init__(self, account_id: str, cooldown: float, clock: Callable[[], float],
                 on_change: Listener | None = None) -> None:
        self.account_id = account_id
        self._on_change = on_change
        self.cooldown = cooldown
        self._clock = clock
        self.state = CLOSED
        self.opened_at = 0.0
        self._probing = False

    def fail_fast(self) -> None:
        """Refuse at once while open and cooling down (before queueing for the rate limit)."""
        if self.state == OPEN and self._clock() - self.opened_at < self.cooldown:
            self.before_call()

    def before_call(self) -> None:
        """Admit the call, or raise AmoBanned (503) while open or while the half-open probe is out."""
        if self.state == CLOSED:
            return
        if self.state == OPEN and self._clock() - self.opened_at >= self.cooldown:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN and not self._probing:
            self._probing = True
            return
        raise AmoBanned(
            "amoCRM answered 403 for this account (its ban on too many requests, or revoked rights); "
            "the gateway stopped calling it until the cool-down passes",
            retry_after=self.retry_after(), reason="amocrm_403_ban",
        )

    def after_call(self, status: int) -> None:
        """Record amoCRM's answer: 403 opens (or re-opens) the breaker, anything else closes it."""
        self._probing = False
        if status == 403:
            opened = self.state != OPEN
            if opened:
                event(log, "breaker.opened", level=logging.ERROR, account=self.account_id, cooldown=self.cooldown)
            self.state, self.opened_at = OPEN, self._clock()
            if opened and self._on_change is not None:
                self._on_change(self.account_id, OPEN)
        elif self.state != CLOSED:
            event(log, "breaker.closed", account=self.account_id)
            self.state = CLOSED
            if self._on_change is not None:
                self._on_change(self.account_id, CLOSED)

    def call_failed(self) -> None:
        """The call got no answer at all: free the probe slot without changing the state."""
        self._probing = False

    def retry_after(self) -> int:
        """Seconds until the next probe may go."""
        return max(1, int(self.opened_at + self.cooldown - self._clock()) + 1)


class Breakers:
    """One breaker per account, created on first use."""

    def __init__(self, cooldown: float, clock: Callable[[], float]) -> None:
        self.cooldown = cooldown
        self._clock = clock
        self._by_account: dict[str, Breaker] = {}
        self.listeners: list[Listener] = []  # the alerts hear of every open and close here

    def get(self, account_id: str) -> Breaker:
        """The account's breaker."""
        breaker = self._by_account.get(account_id)
        if breaker is None:
            breaker = self._by_account[account_id] = Breaker(account_id, self.cooldown, self._clock, self._changed)
        return breaker

    def _changed(self, account_id: str, state: str) -> None:
        for listener in self.listeners:
            listener(account_id, state)

    def states(self) -> dict[str, str]:
        """Each account's state, for the metrics."""
        return {account_id: breaker.state for account_id, breaker in self._by_account.items()}
