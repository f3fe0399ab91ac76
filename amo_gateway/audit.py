"""The audit trail: security-relevant events, appended as JSON lines to `<vault dir>/audit.log` (0600).

Secret values never enter it: they are named by HMAC-SHA256 under a key derived from the primary vault key
(so digests are comparable until the next key rotation, which the trail itself records).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

from amo_gateway.errors import GatewayError
from amo_gateway.logs import event
from amo_gateway.tokens import keyed_digest
from amo_gateway.vault import KeyRing

AUDIT_FILE = "audit.log"
_KEY_LABEL = b"amo-gateway/audit/v1"
_MAX_SEEN = 10_000
log = logging.getLogger("amo_gateway.audit")


def audit_path(vault_path: Path) -> Path:
    """The audit file beside the vault."""
    return vault_path.parent / AUDIT_FILE


def audit_key(keys: KeyRing) -> bytes:
    """The HMAC key of the trail, derived one-way from the primary vault key."""
    return hmac.new(keys.keys[0].encode(), _KEY_LABEL, hashlib.sha256).digest()


def audit_line(key: bytes, name: str, secrets: dict[str, str | None] | None, fields: dict[str, Any]) -> str:
    """One JSON line: time, event, plain fields, and `<name>_hmac` for each secret value."""
    record: dict[str, Any] = {"ts": _timestamp(), "event": name, **fields}
    for field, value in (secrets or {}).items():
        record[f"{field}_hmac"] = keyed_digest(key, value) if value else None
    return json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":"))


def append_lines(path: Path, lines: Iterable[str]) -> None:
    """Blocking: append and fsync; the file is created 0600 and only ever opened for appending."""
    text = "".join(line + "\n" for line in lines)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)  # never a planted symlink
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path, tail: int | None = None) -> list[str]:
    """The trail's lines (the last `tail` of them), for `amo-gateway audit`."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[-tail:] if tail else lines


class AuditLog:
    """Takes events from the event loop without blocking it; a writer task appends them in a thread."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self._key = key
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._seen: set[tuple[str, ...]] = set()
        self._writing = asyncio.Lock()  # flush() waits for a write the writer task has already started

    def __repr__(self) -> str:
        return f"AuditLog({self.path})"

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
            event(log, refused, level=logging.WARNING, reason=err.code, detail=err.detail, **fields)
            self.record(refused, secrets=secrets, reason=err.code, detail=err.detail, **fields)
            raise
        self.record(ok, secrets=secrets, **fields, **extra)

    def digest(self, value: str) -> str:
        """The keyed digest the trail would store for `value` (to find a token in it)."""
        return keyed_digest(self._key, value)

    async def flush(self) -> None:
        """Write everything queued so far."""
        await self._write(self._drain())

    async def run(self) -> None:
        """Forever: wait for an event, then write it with whatever else queued meanwhile."""
        while True:
            first = await self._queue.get()
            await self._write([first, *self._drain()])

    def _drain(self) -> list[str]:
        lines = []
        while not self._queue.empty():
            lines.append(self._queue.get_nowait())
        return lines

    async def _write(self, lines: list[str]) -> None:
        async with self._writing:
            if lines:
                await asyncio.to_thread(append_lines, self.path, lines)


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


def record_now(vault_path: Path, keys: KeyRing, name: str, **fields: Any) -> None:
    """Blocking append of one event, for the command-line tools (no event loop there)."""
    append_lines(audit_path(vault_path), [audit_line(audit_key(keys), name, None, fields)])


def show(vault_path: Path, tail: int | None, as_json: bool) -> list[str]:
    """`amo-gateway audit`: the trail's lines as stored, or as `time event key=value …` for people."""
    lines = read_lines(audit_path(vault_path), tail)
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
