"""The audit trail: security-relevant events as JSON lines, appended to `<vault dir>/audit.log` (0600), or with
AMO_DATABASE_URL to the `amo_audit` table every replica shares (an AuditSink, backends/base.py: this module
does not know which).

Secret values never enter it: they are named by HMAC-SHA256 under a key derived from the primary vault key
(so digests are comparable until the next key rotation, which the trail itself records).

Bounded, so that strangers cannot fill the disk with it: plain string fields are cut at FIELD_LIMIT
characters, repeated refusals of one kind are merged into one line with a count per interval (per process),
and the trail keeps AMO_AUDIT_MAX_BYTES * (AMO_AUDIT_BACKUPS + 1) bytes at most (audit_file.py rotates the
file; backends/pg_audit.py deletes the oldest rows beyond it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amo_gateway.backends.base import AuditSink
from amo_gateway.errors import GatewayError, StateUnavailable
from amo_gateway.logs import event
from amo_gateway.settings import Settings
from amo_gateway.tokens import keyed_digest
from amo_gateway.vault import KeyRing

AUDIT_FILE = "audit.log"
FIELD_LIMIT = 256  # characters kept of a caller-supplied value (an account id, a referer): enough to recognise it
MERGE_SECONDS = 60.0
_KEY_LABEL = b"amo-gateway/audit/v1"
_MAX_SEEN = 10_000
log = logging.getLogger("amo_gateway.audit")


def audit_path(vault_path: Path) -> Path:
    """The audit file beside the vault."""
    return vault_path.parent / AUDIT_FILE


def audit_key(keys: KeyRing) -> bytes:
    """The HMAC key of the trail, derived one-way from the primary vault key."""
    return hmac.new(keys.keys[0].encode(), _KEY_LABEL, hashlib.sha256).digest()


def capped(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields with every string cut at FIELD_LIMIT characters, saying how long it was."""
    return {name: _cap(value) for name, value in fields.items()}


def _cap(value: Any) -> Any:
    if isinstance(value, str) and len(value) > FIELD_LIMIT:
        return f"{value[:FIELD_LIMIT]}…[{len(value)} chars]"
    return value


def audit_line(key: bytes, name: str, secrets: dict[str, str | None] | None, fields: dict[str, Any]) -> str:
    """One JSON line: time, event, plain fields (capped), and `<name>_hmac` for each secret value."""
    record: dict[str, Any] = {"ts": _timestamp(), "event": name, **capped(fields)}
    for field, value in (secrets or {}).items():
        record[f"{field}_hmac"] = keyed_digest(key, value) if value else None
    return json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":"))


@dataclass
class _Run:
    """Refusals of one kind within one merge interval: the first is written in full, the rest only counted."""

    since: str
    ends: float
    count: int = 0


class AuditLog:
    """Takes events from the event loop without blocking it; a writer task appends them in a thread."""

    def __init__(self, key: bytes, sink: AuditSink | None = None, *, merge_seconds: float = MERGE_SECONDS) -> None:
        self.sink = sink  # set by the app's audit context once the state is open, before the writer starts
        self._key = key
        self._merge_seconds = merge_seconds
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._seen: set[tuple[str, ...]] = set()
        self._runs: dict[tuple[str, str], _Run] = {}  # keyed by (event, reason): a small, fixed set of codes
        self._writing = asyncio.Lock()  # flush() waits for a write the writer task has already started

    def __repr__(self) -> str:
        return f"AuditLog({self.sink.where if self.sink else 'not attached'})"

    def record(self, name: str, *, secrets: dict[str, str | None] | None = None, **fields: Any) -> None:
        """Queue one event; `secrets` values are stored only as keyed digests."""
        self._queue.put_nowait(audit_line(self._key, name, secrets, fields))

    def first_time(self, *what: str) -> bool:
        """True the first time `what` is seen (so a consumer polling /token is audited once per token)."""
        if what in self._seen:
            return False
        if len(self._seen) >= _MAX_SEEN:
            self._seen.clear()
        self._seen.add(what)
        return True

    @contextlib.contextmanager
    def outcome(self, ok: str, refused: str, *, secrets: dict[str, str | None] | None = None,
                **fields: Any) -> Iterator[dict[str, Any]]:
        """Record `ok` when the block succeeds (with the fields it adds), `refused` and why when it raises."""
        extra: dict[str, Any] = {}
        try:
            yield extra
        except GatewayError as err:
            if self.refused(refused, err.code, secrets=secrets, detail=err.detail, **fields):
                event(log, refused, level=logging.WARNING, reason=err.code, detail=err.detail, **capped(fields))
            raise
        self.record(ok, secrets=secrets, **fields, **extra)

    def refused(self, name: str, reason: str, *, secrets: dict[str, str | None] | None = None,
                **fields: Any) -> bool:
        """Record a refusal, merged: within `merge_seconds` of the first of its kind (event and reason) the
        rest are only counted, and one line with their count follows. True when this one was written in full.
        """
        now = time.monotonic()
        run = self._runs.get((name, reason))
        if run is not None and now < run.ends:
            run.count += 1
            return False
        if run is not None:
            self._close((name, reason))
        self._runs[(name, reason)] = _Run(_timestamp(), now + self._merge_seconds)
        self.record(name, secrets=secrets, reason=reason, **fields)
        return True

    def _close_runs(self, now: float | None) -> None:
        """Close every run that has ended by `now` (every run when None)."""
        for key in [k for k, run in self._runs.items() if now is None or now >= run.ends]:
            self._close(key)

    def _close(self, key: tuple[str, str]) -> None:
        """Forget a run; when refusals were merged into it, queue one line (and one log event) with their count."""
        run = self._runs.pop(key)
        if run.count:
            name, reason = key
            event(log, name, level=logging.WARNING, reason=reason, repeated=run.count, since=run.since)
            self.record(name, reason=reason, repeated=run.count, since=run.since,
                        interval_seconds=self._merge_seconds)

    def _next_close(self) -> float | None:
        """Seconds until the earliest run ends (its count must be written even if no refusal follows)."""
        if not self._runs:
            return None
        return max(min(run.ends for run in self._runs.values()) - time.monotonic(), 0.0)

    def digest(self, value: str) -> str:
        """The keyed digest the trail would store for `value` (to find a token in it)."""
        return keyed_digest(self._key, value)

    async def flush(self) -> None:
        """Write everything queued so far, the counts of merged refusals included."""
        self._close_runs(None)
        await self._write(self._drain())

    async def run(self) -> None:
        """Forever: wait for an event (or the end of a merge interval), then write what queued meanwhile."""
        while True:
            first: list[str] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_close()):  # not wait_for: its inner task could take an
                    first.append(await self._queue.get())  # event from the queue while flush() sees it empty
            self._close_runs(time.monotonic())
            await self._write([*first, *self._drain()])

    async def recent(self, limit: int) -> list[str]:
        """The trail's last `limit` lines, oldest first, after writing what is queued (what was just done shows)."""
        await self.flush()
        return await self.sink.tail(limit) if self.sink is not None else []

    def _drain(self) -> list[str]:
        lines = []
        while not self._queue.empty():
            lines.append(self._queue.get_nowait())
        return lines

    async def _write(self, lines: list[str]) -> None:
        """Append; a failed write (a full disk, the database away) is logged and the lines dropped, so memory
        stays bounded and the writer lives on: the trail must never take the service down with it."""
        async with self._writing:
            if not lines or self.sink is None:
                return
            try:
                await self.sink.append(lines)
            except (OSError, StateUnavailable) as err:
                why = err.strerror if isinstance(err, OSError) else err.detail
                event(log, "audit.write_failed", level=logging.ERROR, error=why, lines_lost=len(lines))


async def audit_ctx_body(audit: AuditLog) -> AsyncIterator[None]:
    """Run the writer for the app's lifetime; on the way out, write what is still queued."""
    task = asyncio.create_task(audit.run(), name="amo-gateway-audit")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await audit.flush()


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def record_now(settings: Settings, keys: KeyRing, name: str, **fields: Any) -> None:
    """Blocking append of one event, for the command-line tools (no event loop there), wherever the trail is."""
    line = audit_line(audit_key(keys), name, None, fields)

    async def append() -> None:
        from amo_gateway.backends import standalone_audit

        async with standalone_audit(settings) as sink:
            await sink.append([line])

    asyncio.run(append())


def read_trail(settings: Settings, tail: int | None) -> tuple[str, list[str]]:
    """Blocking: (where the trail is, its last `tail` lines or all of them), for `amo-gateway audit`."""
    async def read() -> tuple[str, list[str]]:
        from amo_gateway.backends import standalone_audit

        async with standalone_audit(settings) as sink:
            return sink.where, await sink.tail(tail or None)

    return asyncio.run(read())


def show(lines: list[str], as_json: bool) -> list[str]:
    """`amo-gateway audit`: the trail's lines as stored, or as `time event key=value …` for people."""
    if as_json:
        return lines
    return [_human(line) for line in lines]


def _human(line: str) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        return line
    ts, name = record.pop("ts", "-"), record.pop("event", "-")
    rest = " ".join(f"{k}={v}" for k, v in record.items() if v is not None)
    return f"{ts} {name:<20} {rest}"
