"""A tiny per-account answer cache, so that polling /test cannot eat amoCRM's 7 rps budget."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TestCache:
    """Answers of /test per account for a few seconds (errors are not cached)."""

    __test__ = False  # not a pytest class
    entries: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)

    def get(self, account_id: str) -> dict[str, Any] | None:
        entry = self.entries.get(account_id)
        return entry[1] if entry and entry[0] > time.monotonic() else None

    def put(self, account_id: str, body: dict[str, Any], seconds: float) -> None:
        if seconds > 0:
            self.entries[account_id] = (time.monotonic() + seconds, body)

    def clear(self) -> None:
        self.entries.clear()

