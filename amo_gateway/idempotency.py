"""Idempotency keys for POST/PATCH through the proxy: amoCRM has none, so the gateway remembers answers.

A caller that sends `Idempotency-Key` gets amoCRM's first answer replayed to any retry with the same key
(per consumer, within the window) instead of a second create. Kept in memory: a restart forgets the keys.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from amo_gateway.errors import BadRequest, IdempotencyConflict

MAX_KEY_LENGTH = 255
MAX_ENTRIES = 10_000
MAX_REMEMBERED_BODY = 1024 * 1024


@dataclass
class Remembered:
    """amoCRM's answer to the first request with a key; `body` None while in flight or when too large."""

    request_fp: str
    expires_at: float
    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    outcome_unknown: bool = False


def request_fingerprint(method: str, target: str) -> str:
    """What a retry must repeat to be the same request: the method and the path with query."""
    return hashlib.sha256(f"{method} {target}".encode()).hexdigest()


class IdempotencyStore:
    """Remembered answers by (consumer, key), oldest dropped first beyond MAX_ENTRIES."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], Remembered] = OrderedDict()

    def begin(self, consumer: str, key: str, request_fp: str) -> Remembered | None:
        """A finished answer to replay, or None after reserving the key for this request; 409 on conflicts."""
        if not key or len(key) > MAX_KEY_LENGTH:
            raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters", code="bad_idempotency_key")
        self._prune()
        found = self._entries.get((consumer, key))
        if found is None:
            self._entries[(consumer, key)] = Remembered(request_fp, self._clock() + self.window)
            return None
        if found.request_fp != request_fp:
            raise IdempotencyConflict("this Idempotency-Key was used for a different request")
        if found.outcome_unknown:
            raise IdempotencyConflict("the first request with this Idempotency-Key got no answer from amoCRM, "
                                      "which may have processed it; check before sending it under a new key")
        if found.status is None:
            raise IdempotencyConflict("a request with this Idempotency-Key is still in flight", retry_after=1)
        if found.body is None:
            raise IdempotencyConflict("amoCRM answered the first request with this key, but the answer was too "
                                      "large to keep for a replay")
        return found

    def finish(self, consumer: str, key: str, status: int, headers: tuple[tuple[str, str], ...],
               body: bytes | None) -> None:
        """Remember amoCRM's answer (body None when too large to keep)."""
        found = self._entries.get((consumer, key))
        if found is not None:
            found.status, found.headers, found.body = status, headers, body

    def unknown(self, consumer: str, key: str) -> None:
        """The request may have reached amoCRM but no answer came: a retry must not resend it."""
        found = self._entries.get((consumer, key))
        if found is not None:
            found.outcome_unknown = True

    def forget(self, consumer: str, key: str) -> None:
        """The request surely never reached amoCRM (refused before sending): the key is free again."""
        self._entries.pop((consumer, key), None)

    def _prune(self) -> None:
        now = self._clock()
        while self._entries:
            first = next(iter(self._entries.values()))
            if first.expires_at > now and len(self._entries) < MAX_ENTRIES:
                break
            self._entries.popitem(last=False)
