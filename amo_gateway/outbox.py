"""The alert outbox: a durable JSON file beside the vault (`<vault>.alerts`), shared by every process.

It holds three things, none of them secret (account ids, subdomains, reasons, times; never a token, a code
or a key), so it is not encrypted, but it is written like the vault: a temp file in the same directory,
fsync, `os.replace`, a directory fsync, all under an `flock` on `<vault>.alerts.lock`:

- `pending`: deliveries not yet accepted, one per alert and target, in order; bounded (`max_pending`),
  the oldest dropped first and counted in `dropped`;
- `history`: the alerts raised, newest last, with each target's delivery state (what a console lists);
- `active`: the alert conditions in force and when each was last sent: the durable record that makes
  processes sharing a vault send one alert per state change, not one each.

The file's changes are sync code, like vault.py; the OutboxStore methods (backends/base.py) run them in a
thread. With AMO_DATABASE_URL the same outbox lives in PostgreSQL instead (backends/pg_outbox.py), running
the same OutboxData changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from amo_gateway.atomic import write_atomically
from amo_gateway.backends.base import Decide
from amo_gateway.vault import Unchanged, open_no_follow

T = TypeVar("T")
HISTORY_MAX = 500
PENDING, DELIVERED, DROPPED = "pending", "delivered", "dropped"
_PART = ".part-"  # not ".tmp-": the crash loop counts the vault's own temp files by that name


def outbox_path(vault_path: Path) -> Path:
    """The outbox file beside the vault."""
    return vault_path.with_name(vault_path.name + ".alerts")


@dataclass
class OutboxData:
    """The whole outbox file."""

    pending: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    active: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped: int = 0
    version: int = 1

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OutboxData:
        return cls(list(raw.get("pending", [])), list(raw.get("history", [])), dict(raw.get("active", {})),
                   int(raw.get("dropped", 0)), int(raw.get("version", 1)))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "pending": self.pending, "history": self.history,
                "active": self.active, "dropped": self.dropped}

    def enqueue(self, payload: dict[str, Any], targets: list[str], now: float, max_pending: int) -> None:
        """Record the alert in the history and queue one delivery per target; drop the oldest beyond the bound."""
        self.history.append({**payload, "targets": dict.fromkeys(targets, PENDING)})
        del self.history[:-HISTORY_MAX]
        for target in targets:
            self.pending.append({"id": payload["id"], "target": target, "payload": payload, "attempts": 0,
                                 "next_at": now, "lease_until": 0.0, "lease": None, "last_error": None})
        while len(self.pending) > max_pending:
            oldest = self.pending.pop(0)
            self.dropped += 1
            self._mark(oldest, DROPPED)

    def claim(self, target: str, now: float, lease_until: float, owner: str, batch: int) -> list[dict[str, Any]]:
        """The target's next deliveries in order, leased to `owner`; none while its first one waits (order)."""
        queue = [e for e in self.pending if e["target"] == target]
        if not queue or queue[0]["next_at"] > now or queue[0]["lease_until"] > now:
            return []
        taken = [e for e in queue[:batch] if e["lease_until"] <= now]
        for entry in taken:
            entry["lease_until"], entry["lease"] = lease_until, owner
        return [dict(e) for e in taken]

    def delivered(self, entry_id: str, target: str, now: float) -> None:
        """The target took it: out of the queue, and the history says so."""
        entry = self._find(entry_id, target)
        if entry is not None:
            self.pending.remove(entry)
            self._mark(entry, DELIVERED, now)

    def failed(self, entry_id: str, target: str, retry_at: float, why: str) -> None:
        """Not taken: try again at `retry_at`."""
        entry = self._find(entry_id, target)
        if entry is not None:
            entry.update(attempts=entry["attempts"] + 1, next_at=retry_at, lease_until=0.0, lease=None,
                         last_error=why)

    def release(self, entry_id: str, target: str, owner: str) -> None:
        """Give a leased entry back untried (an earlier one of its target failed first)."""
        entry = self._find(entry_id, target)
        if entry is not None and entry["lease"] == owner:
            entry.update(lease_until=0.0, lease=None)

    def forget_targets(self, configured: set[str]) -> None:
        """Drop the deliveries to targets no longer configured (the history says dropped; not counted as lost)."""
        for entry in [e for e in self.pending if e["target"] not in configured]:
            self.pending.remove(entry)
            self._mark(entry, DROPPED)

    def _find(self, entry_id: str, target: str) -> dict[str, Any] | None:
        return next((e for e in self.pending if e["id"] == entry_id and e["target"] == target), None)

    def _mark(self, entry: dict[str, Any], state: str, when: float | None = None) -> None:
        for alert in reversed(self.history):
            if alert["id"] == entry["id"]:
                mark(alert, entry["target"], state, when)
                return

    def record(self, decide: Decide, targets: Sequence[str], now: float, max_pending: int
               ) -> list[dict[str, Any]] | Unchanged[list[dict[str, Any]]]:
        """OutboxStore.record's change: forget unconfigured targets, decide, queue; Unchanged when nothing moved."""
        before = (repr(self.active), len(self.pending))
        self.forget_targets(set(targets))  # a target no longer configured waits for nothing
        alerts = decide(self.active)
        for alert in alerts:
            self.enqueue(alert, list(targets), now, max_pending)
        return alerts if alerts or (repr(self.active), len(self.pending)) != before else Unchanged(alerts)

    def has_due(self, target: str, now: float) -> bool:
        """Whether the target's first delivery may be claimed now (a claim would change something)."""
        head = next((e for e in self.pending if e["target"] == target), None)
        return head is not None and head["next_at"] <= now and head["lease_until"] <= now


def mark(alert: dict[str, Any], target: str, state: str, when: float | None = None) -> None:
    """A history entry's delivery state for one target (and when it was delivered)."""
    alert["targets"][target] = state
    if when is not None:
        alert.setdefault("delivered_at", {})[target] = when


class Outbox:
    """The outbox file and its lock (an OutboxStore); every change is a locked read-modify-write in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    async def prepare(self) -> str | None:
        """See `prepare_file` (in a thread)."""
        return await asyncio.to_thread(self.prepare_file)

    def prepare_file(self) -> str | None:
        """Sweep temp files of writers that died mid-write; set a file that does not parse aside.

        Alerts must never stop the gateway: an outbox edited into nonsense is renamed `<outbox>.corrupt`
        (kept for a human) and a new one begins. Returns that name when it happened.
        """
        with self.locked():
            for leftover in self.path.parent.glob(self.path.name + _PART + "*"):
                leftover.unlink(missing_ok=True)
            try:
                self.read()
            except (ValueError, TypeError, AttributeError):
                aside = self.path.with_name(self.path.name + ".corrupt")
                os.replace(self.path, aside)
                return aside.name
        return None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = open_no_follow(self.lock_path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self) -> OutboxData:
        """The file as last replaced (no lock needed: a reader sees the old or the new file, never half)."""
        try:
            fd = open_no_follow(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return OutboxData()
        with os.fdopen(fd, "rb") as handle:
            return OutboxData.from_dict(json.loads(handle.read()))

    def update(self, change: Callable[[OutboxData], T | Unchanged[T]]) -> T:
        """Locked read-modify-write; saved unless `change` says Unchanged."""
        with self.locked():
            data = self.read()
            result = change(data)
            if isinstance(result, Unchanged):
                return result.value
            self._save(data)
            return result

    def _history(self, account_id: str | None, limit: int) -> list[dict[str, Any]]:
        alerts = [a for a in self.read().history if account_id is None or a.get("account_id") == account_id]
        return list(reversed(alerts))[:limit]

    # OutboxStore: what the alert service asks, each step in a thread.
    async def record(self, decide: Decide, targets: Sequence[str], now: float, max_pending: int
                     ) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.update, lambda box: box.record(decide, targets, now, max_pending))

    async def claim(self, target: str, now: float, lease_until: float, owner: str, batch: int
                    ) -> list[dict[str, Any]]:
        if not (await asyncio.to_thread(self.read)).has_due(target, now):
            return []  # read without the lock first: a claim of nothing would rewrite the file each tick
        return await asyncio.to_thread(self.update, lambda box: box.claim(target, now, lease_until, owner, batch))

    async def delivered(self, entry_id: str, target: str, now: float) -> None:
        await asyncio.to_thread(self.update, lambda box: box.delivered(entry_id, target, now))

    async def failed(self, entry_id: str, target: str, retry_at: float, why: str) -> None:
        await asyncio.to_thread(self.update, lambda box: box.failed(entry_id, target, retry_at, why))

    async def release(self, target: str, entry_ids: Sequence[str], owner: str) -> None:
        def change(box: OutboxData) -> None:
            for entry_id in entry_ids:
                box.release(entry_id, target, owner)

        if entry_ids:
            await asyncio.to_thread(self.update, change)

    async def history(self, account_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The alerts raised (for one account, or all), newest first, with each target's delivery state."""
        return await asyncio.to_thread(self._history, account_id, limit)

    async def counts(self) -> tuple[int, int]:
        box = await asyncio.to_thread(self.read)
        return len(box.pending), box.dropped

    def _save(self, data: OutboxData) -> None:
        blob = json.dumps(data.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()
        write_atomically(self.path, blob, _PART)
