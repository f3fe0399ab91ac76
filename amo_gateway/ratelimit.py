"""Per-account rate limit: a sliding-window log, so no one-second window ever holds more than `limit` sends.

A token bucket lets a full burst through at the end of one second and another at the start of the next;
amoCRM counts any one-second span, so the limiter remembers the send times of the last `limit` requests
and lets the next one go only when the oldest of them is more than a window old. Waiters queue in FIFO
order behind one asyncio.Lock (CPython's Lock hands over in arrival order), and the queue is bounded.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

from amo_gateway.errors import QueueFull

Sleep = Callable[[float], Awaitable[None]]


class SlidingWindowLimiter:
    """At most `limit` acquisitions in any `window` seconds; at most `queue` callers waiting."""

    def __init__(self, limit: int, queue: int, *, window: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.limit = limit
        self.queue = queue
        self.window = window
        self._clock = clock
        self._sleep = sleep
        self._sent: deque[float] = deque(maxlen=limit)
        self._lock = asyncio.Lock()
        self.waiting = 0

    async def acquire(self) -> None:
        """Wait for a free slot in FIFO order; QueueFull (429 with Retry-After) when the queue is full."""
        if self.waiting >= self.queue:
            raise QueueFull("too many requests are queued for this amoCRM account; retry later",
                            retry_after=self.retry_after())
        self.waiting += 1
        try:
            async with self._lock:
                await self._take()
        finally:
            self.waiting -= 1

    def retry_after(self) -> int:
        """Seconds until the queue ahead would have drained, at least 1."""
        return max(1, math.ceil((self.waiting + 1) / self.limit * self.window))

    async def _take(self) -> None:
        """Wait until a send fits the window and record it (a shared limiter records it in the database)."""
        await self._wait_for_slot()
        self._sent.append(self._clock())

    async def _wait_for_slot(self) -> None:
        while len(self._sent) == self.limit:
            free_at = self._sent[0] + self.window
            now = self._clock()
            if now >= free_at:
                return
            await self._sleep(free_at - now)


class Limiters:
    """One limiter per amoCRM account, created on first use (in this process: the file backend's limit is per
    process, as one gateway process per machine is the file backend's deployment)."""

    def __init__(self, limit: int, queue: int, *, window: float = 1.0) -> None:
        self.limit = limit
        self.queue = queue
        self.window = window
        self._by_account: dict[str, SlidingWindowLimiter] = {}

    def get(self, account_id: str) -> SlidingWindowLimiter:
        """The account's limiter."""
        limiter = self._by_account.get(account_id)
        if limiter is None:
            limiter = self._make(account_id)
            self._by_account[account_id] = limiter
        return limiter

    def _make(self, account_id: str) -> SlidingWindowLimiter:
        return SlidingWindowLimiter(self.limit, self.queue, window=self.window)

    def depths(self) -> dict[str, int]:
        """Callers waiting, per account (for the metrics)."""
        return {account_id: limiter.waiting for account_id, limiter in self._by_account.items()}
