"""How often a 401 from amoCRM may spend the account's refresh token through the proxy.

A 401 usually means the access token died early, and one refresh fixes it. But a path may answer 401
whatever the token (no rights, a disabled user), and refreshing for each such answer would let any caller
spend single-use refresh tokens, and two vault writes each, at the proxy's request rate. So a 401-triggered
refresh closes the account's budget for `interval` seconds. The budget reopens at once when the retried
call gets past the 401 (the refresh was needed); it stays closed when the retry still gets 401 or could
not be sent, and meanwhile callers get amoCRM's 401 as it came.

Kept in memory, per process, with the vault file: a restart forgets it at the cost of at most one more
refresh, and processes sharing a vault never refresh the same token twice anyway (the token manager's lock
sees to that). With AMO_DATABASE_URL the closed-until time is shared by every replica (backends/pg_budget.py),
so N replicas behind a balancer spend one refresh per interval, not N; the lock stays per process (it only
makes a burst of this process's 401s wait for one decision).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class RefreshBudget:
    """Per account: may a 401 trigger a refresh now; and one 401 decision at a time."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._closed_until: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, account_id: str) -> asyncio.Lock:
        """Held while deciding about a 401, so that a burst of 401s on one token costs one refresh."""
        return self._locks.setdefault(account_id, asyncio.Lock())

    async def take(self, account_id: str) -> bool:
        """If a 401 may trigger a refresh of this account now, close the budget for `interval` seconds (the
        refresh is being spent) and say True; else False."""
        now = self._clock()
        if now < self._closed_until.get(account_id, 0.0):
            return False
        self._closed_until[account_id] = now + self.interval
        return True

    async def reopen(self, account_id: str) -> None:
        """The refresh was needed (its retry got past the 401) or spent nothing: the budget is whole again."""
        self._closed_until.pop(account_id, None)
