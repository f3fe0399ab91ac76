"""Idempotency keys for POST/PATCH through the proxy: amoCRM has none, so the gateway remembers answers.

A caller that sends `Idempotency-Key` gets amoCRM's first answer replayed to any retry with the same key
(per consumer, within the window) instead of a second create. Kept in memory: a restart forgets the keys.

Memory is bounded twice: at most MAX_ENTRIES records, and at most `max_bytes` of remembered answers (bodies
and headers) in all. Beyond the byte cap the least recently used answers lose their bodies but keep their
record, so a retry with such a key gets 409 instead of a second create. Answers are kept decoded (no
`Content-Encoding`), so that a replay can honour its own caller's `Accept-Encoding`.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from amo_gateway.errors import BadRequest, IdempotencyConflict

MAX_KEY_LENGTH = 255
MAX_ENTRIES = 10_000
MAX_REMEMBERED_BODY = 1024 * 1024
_DECODABLE = {"gzip": zlib.MAX_WBITS | 32, "x-gzip": zlib.MAX_WBITS | 32, "deflate": zlib.MAX_WBITS | 32}
Headers = tuple[tuple[str, str], ...]


@dataclass
class Remembered:
    """amoCRM's answer to the first request with a key; `body` None while in flight or when not kept."""

    request_fp: str
    expires_at: float
    status: int | None = None
    headers: Headers = ()
    body: bytes | None = None
    outcome_unknown: bool = False
    evicted: bool = False

    @property
    def weight(self) -> int:
        """Bytes this record holds against the cap: its body and headers."""
        if self.body is None:
            return 0
        return len(self.body) + sum(len(k) + len(v) + 4 for k, v in self.headers)


def request_fingerprint(method: str, target: str) -> str:
    """What a retry must repeat to be the same request: the method and the path with query."""
    return hashlib.sha256(f"{method} {target}".encode()).hexdigest()


def decoded(headers: Headers, body: bytes, limit: int = MAX_REMEMBERED_BODY) -> tuple[Headers, bytes] | None:
    """The answer without its content coding (gzip or deflate), at most `limit` bytes; None if it cannot be."""
    coding = next((v.strip().lower() for k, v in headers if k.lower() == "content-encoding"), "identity")
    if coding == "identity":
        return headers, body
    wbits = _DECODABLE.get(coding)
    if wbits is None:
        return None  # br, zstd, stacked codings: not worth a dependency; the key then answers 409 on a retry
    inflater = zlib.decompressobj(wbits)
    try:
        plain = inflater.decompress(body, limit + 1)  # bounded: a small gzip bomb cannot fill memory
    except zlib.error:
        return None
    if len(plain) > limit or not inflater.eof:
        return None
    kept = tuple((k, v) for k, v in headers if k.lower() not in ("content-encoding", "content-length"))
    return kept, plain


class IdempotencyStore:
    """Remembered answers by (consumer, key), least recently used first out, under a total byte cap."""

    def __init__(self, window: float, max_bytes: int = 32 * 1024 * 1024, clock: Callable[[], float] = time.monotonic,
                 on_evict: Callable[[], None] | None = None) -> None:
        self.window = window
        self.max_bytes = max_bytes
        self.size = 0  # bytes of remembered answers, kept equal to the sum of the records' weights
        self._clock = clock
        self._on_evict = on_evict
        self._entries: OrderedDict[tuple[str, str], Remembered] = OrderedDict()

    def begin(self, consumer: str, key: str, request_fp: str) -> Remembered | None:
        """A finished answer to replay, or None after reserving the key for this request; 409 on conflicts."""
        if not key or len(key) > MAX_KEY_LENGTH:
            raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters", code="bad_idempotency_key")
        self._prune()
        found = self._live((consumer, key))
        if found is None:
            self._entries[(consumer, key)] = Remembered(request_fp, self._clock() + self.window)
            return None
        self._entries.move_to_end((consumer, key))
        return replayable(found, request_fp)

    def finish(self, consumer: str, key: str, status: int, headers: Headers, body: bytes | None) -> None:
        """Remember amoCRM's answer (body None when too large or undecodable), then keep under the cap."""
        found = self._entries.get((consumer, key))
        if found is None:
            return
        self._drop_body(found)
        found.status, found.headers, found.body = status, headers, body
        if found.weight > self.max_bytes:
            found.body = None  # larger than the whole cap: never kept
        self.size += found.weight
        self._evict()

    def unknown(self, consumer: str, key: str) -> None:
        """The request may have reached amoCRM but no answer came: a retry must not resend it."""
        found = self._entries.get((consumer, key))
        if found is not None:
            found.outcome_unknown = True

    def forget(self, consumer: str, key: str) -> None:
        """The request surely never reached amoCRM (refused before sending): the key is free again."""
        found = self._entries.pop((consumer, key), None)
        if found is not None:
            self._drop_body(found)

    def _live(self, where: tuple[str, str]) -> Remembered | None:
        """The record under this key unless its window has passed (LRU order is not expiry order)."""
        found = self._entries.get(where)
        if found is not None and found.expires_at <= self._clock():
            self._drop_body(self._entries.pop(where))
            return None
        return found

    def _drop_body(self, entry: Remembered) -> None:
        self.size -= entry.weight
        entry.body = None

    def _evict(self) -> None:
        """Drop the bodies of the least recently used answers until the rest fit under the cap."""
        for entry in self._entries.values():
            if self.size <= self.max_bytes:
                return
            if entry.body is not None:
                self._drop_body(entry)
                entry.evicted = True
                if self._on_evict is not None:
                    self._on_evict()

    def _prune(self) -> None:
        now = self._clock()
        while self._entries:
            first = next(iter(self._entries.values()))
            if first.expires_at > now and len(self._entries) < MAX_ENTRIES:
                break
            self._drop_body(self._entries.popitem(last=False)[1])


def replayable(found: Remembered, request_fp: str) -> Remembered:
    """The record if it can be replayed to this request; IdempotencyConflict (409) saying why not."""
    if found.request_fp != request_fp:
        raise IdempotencyConflict("this Idempotency-Key was used for a different request")
    if found.outcome_unknown:
        raise IdempotencyConflict("the first request with this Idempotency-Key got no answer from amoCRM, "
                                  "which may have processed it; check before sending it under a new key")
    if found.status is None:
        raise IdempotencyConflict("a request with this Idempotency-Key is still in flight", retry_after=1)
    if found.evicted:
        raise IdempotencyConflict("amoCRM answered the first request with this key, but the answer was evicted "
                                  "from memory (AMO_IDEMPOTENCY_MAX_BYTES) and cannot be replayed")
    if found.body is None:
        raise IdempotencyConflict("amoCRM answered the first request with this key, but the answer was too "
                                  "large (or in a content coding the gateway does not decode) to keep for a replay")
    return found


class Answers(Protocol):
    """Where the proxy keeps remembered answers: this process's memory, or (PostgreSQL) every replica's table."""

    @property
    def size(self) -> int:
        """Bytes of answers held in this process's memory (0 when they live in the database)."""

    async def begin(self, consumer: str, key: str, request_fp: str) -> Remembered | None:
        """As IdempotencyStore.begin."""

    async def finish(self, consumer: str, key: str, status: int, headers: Headers, body: bytes | None) -> None:
        """As IdempotencyStore.finish."""

    async def unknown(self, consumer: str, key: str) -> None:
        """As IdempotencyStore.unknown."""

    async def forget(self, consumer: str, key: str) -> None:
        """As IdempotencyStore.forget."""


class LocalAnswers:
    """The in-memory IdempotencyStore behind the async interface (file backend: one process per machine)."""

    def __init__(self, store: IdempotencyStore) -> None:
        self.store = store

    @property
    def size(self) -> int:
        return self.store.size

    async def begin(self, consumer: str, key: str, request_fp: str) -> Remembered | None:
        return self.store.begin(consumer, key, request_fp)

    async def finish(self, consumer: str, key: str, status: int, headers: Headers, body: bytes | None) -> None:
        self.store.finish(consumer, key, status, headers, body)

    async def unknown(self, consumer: str, key: str) -> None:
        self.store.unknown(consumer, key)

    async def forget(self, consumer: str, key: str) -> None:
        self.store.forget(consumer, key)
