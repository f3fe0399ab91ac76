"""A tiny per-account answer cache, so that polling /test cannot eat amoCRM's 7 rps budget."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

Body = dict[str, Any]
STALE = 30.0  # seconds an expired answer may still be served while a probe renews it


@dataclass
class TestCache:
    """Answers of /test per account for a few seconds (errors are not cached); concurrent misses share one probe.

    A stale answer (up to STALE seconds past its time) is served at once while one probe renews it, so
    polls never queue behind the proxy's rate limiter.
    """

    __test__ = False  # not a pytest class
    entries: dict[str, tuple[float, Body]] = field(default_factory=dict)
    probes: dict[str, asyncio.Future[Body]] = field(default_factory=dict)

    def get(self, account_id: str) -> Body | None:
        entry = self.entries.get(account_id)
        return entry[1] if entry and entry[0] > time.monotonic() else None

    def put(self, account_id: str, body: Body, seconds: float) -> None:
        if seconds > 0:
            self.entries[account_id] = (time.monotonic() + seconds, body)

    async def get_or_probe(self, account_id: str, probe: Callable[[], Awaitable[Body]], seconds: float) -> Body:
        """The cached answer, or the one probe in flight, or a new probe (one per account at a time)."""
        entry = self.entries.get(account_id)
        now = time.monotonic()
        if entry and entry[0] > now:
            return entry[1]
        running = self.probes.get(account_id)
        if running is None:
            running = asyncio.ensure_future(probe())
            self.probes[account_id] = running
            running.add_done_callback(lambda done: self._landed(account_id, done, seconds))
        if entry and entry[0] + STALE > now:
            return entry[1]
        return await asyncio.shield(running)

    def _landed(self, account_id: str, done: asyncio.Future[Body], seconds: float) -> None:
        self.probes.pop(account_id, None)
        if done.cancelled() or done.exception() is not None:
            self.entries.pop(account_id, None)  # a failed probe: the next poll waits for a fresh answer
        else:
            self.put(account_id, done.result(), seconds)

    def clear(self) -> None:
        self.entries.clear()
