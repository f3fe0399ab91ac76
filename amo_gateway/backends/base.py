"""The state seam: what the gateway asks of its shared state, whichever engine keeps it.

Two backends implement `StateStore`: the encrypted vault file (store.Store, one machine, an `flock`) and
PostgreSQL (backends.postgres.PgStore, N replicas, row locks). Handlers, flows, the token manager and the
refresher see only this interface. Every operation is one atomic step: the file backend runs the pure
change functions (`_claim`, `_apply` in manager.py; `_reserve`, `_release`, `_add_state`, `_pop_state`,
`_forget` in flows.py) under its lock; PostgreSQL runs the same functions inside one short transaction
over the rows it locked, so both backends decide alike. Beside it, `OutboxStore` (the alert outbox) and
`AuditSink` (the audit trail) have a file and a PostgreSQL version each; backends.open_outbox/open_audit pick.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

from amo_gateway.idempotency import Answers
from amo_gateway.ratelimit import Limiters
from amo_gateway.tokens import Account, InFlight, PendingState, VaultData
from amo_gateway.vault import KeyRing

if TYPE_CHECKING:
    from amo_gateway.manager import Outcome

Claim = tuple[Account, InFlight | None]  # the account marked in flight, and the marker it carried before (if any)


class RefreshLockSet(Protocol):
    """Single-flight refresh per account, across coroutines, processes and (PostgreSQL) replicas."""

    def hold(self, account_id: str) -> AbstractAsyncContextManager[None]:
        """Wait for the account's lock and hold it for the block."""

    async def try_hold(self, account_id: str) -> bool:
        """Take the lock without waiting; False when anyone holds it. Pair a True with `release`."""

    async def release(self, account_id: str) -> None:
        """Give back a lock taken by `try_hold`."""

    async def try_hold_many(self, account_ids: Sequence[str]) -> list[str]:
        """`try_hold` for a batch (one round trip where the backend allows); returns the ids now held."""

    async def release_many(self, account_ids: Sequence[str]) -> None:
        """`release` for a batch."""

    def close(self) -> None:
        """Drop whatever the lock set holds open (a file descriptor)."""


class StateStore(Protocol):
    """Accounts and their token pairs, pending states, exchange slots and in-flight markers, shared."""

    @property
    def keys(self) -> KeyRing:
        """The vault key ring the state is sealed with (the console derives its session key from it)."""

    @property
    def where(self) -> str:
        """Where the state lives, for messages: the vault's path, or `PostgreSQL`."""

    async def open(self) -> None:
        """Prepare the backend (directory or migrations) and read the state once; fail start-up if unusable."""

    async def close(self) -> None:
        """Release connections and listeners."""

    async def snapshot(self, *, recheck: bool = False) -> VaultData:
        """Every account (what the refresher plans from); may be a cache a few ms behind other writers.

        `recheck` asks the backend itself (probes). Anything that decides on a refresh token goes through
        `claim`, never this view.
        """

    async def reload(self) -> VaultData:
        """Like `snapshot`, but read from the backend now (after a miss another process may explain)."""

    async def account(self, account_id: str) -> Account | None:
        """One account from the current view."""

    async def claim(self, account_ids: Sequence[str], now: float, margin: float, seen: str | None, *,
                    skip_locked: bool) -> list[Claim]:
        """Mark the accounts still needing a refresh as in flight, durably, before amoCRM is called.

        `seen`: skip an account whose access token is no longer that one (someone refreshed it meanwhile).
        `skip_locked`: the scheduler's batches pass over accounts another writer is changing right now.
        """

    async def store_outcomes(self, outcomes: Sequence[Outcome], now: float) -> dict[str, Account]:
        """Store every refresh result in one step (`now`: when they came back); a forgotten account stays so."""

    async def put_account(self, account: Account) -> None:
        """Store a newly connected (or reconnected) account, replacing any earlier record of it."""

    async def forget(self, account_id: str) -> bool:
        """Remove the account; False when there was none."""

    async def reserve_exchange(self, slot: str, now: float, until: float, state_key: str,
                               pending: PendingState) -> None:
        """Take the login's exchange slot until `until` and record the state, or raise ExchangeTooSoon."""

    async def release_exchange(self, slot: str, state_key: str) -> None:
        """Give the slot and its state back (amoCRM did not count the call)."""

    async def add_state(self, key: str, pending: PendingState, now: float) -> None:
        """Record a state the callback will accept once (expired ones are dropped on the way)."""

    async def peek_state(self, key: str) -> PendingState | None:
        """The pending state under `key`, without using it up."""

    async def pop_state(self, key: str) -> PendingState | None:
        """Use the state up: of several callers, exactly one gets it."""

    async def wait_for_change(self, poll: float) -> None:
        """Return once another process or replica has changed the state (the refresher re-plans)."""

    def refresh_locks(self) -> RefreshLockSet:
        """The per-account refresh locks that exclude every process sharing this state."""

    def limiters(self, limit: int, queue: int, *, window: float) -> Limiters:
        """The per-account amoCRM budgets: per process for the file, shared by every replica in PostgreSQL."""

    def degraded(self) -> str | None:
        """Why reads may be served from a copy that cannot catch up (the database is unreachable), else None."""

    def answers(self, window: float, max_bytes: int, *, on_evict: Callable[[], None] | None = None) -> Answers:
        """Where the proxy remembers Idempotency-Key answers: this process, or every replica's database."""


Active = dict[str, dict[str, Any]]  # the alert conditions in force, by `account_id|kind` (alerts.Condition.record)
Decide = Callable[[Active], list[dict[str, Any]]]  # updates the active record in place, returns the alerts to queue


class OutboxStore(Protocol):
    """The alert outbox: the active conditions, the queue of deliveries and the history of alerts raised.

    Two implementations: the JSON file beside the vault (outbox.Outbox, an `flock`) and PostgreSQL
    (backends.pg_outbox.PgOutbox, one row lock). Every change is one atomic step under the outbox's lock, so
    processes and replicas sharing it raise one alert per state change and deliver each one once (a lease
    per delivery; a holder killed mid-delivery leaves it to be sent again, with the same `id`, after it).
    """

    async def prepare(self) -> str | None:
        """Make the outbox usable; returns the name an unreadable one was set aside as, else None."""

    async def record(self, decide: Decide, targets: Sequence[str], now: float, max_pending: int
                     ) -> list[dict[str, Any]]:
        """Under the lock: drop deliveries to targets not in `targets`, run `decide` over the active record,
        queue each alert it returns to every target (the oldest dropped beyond `max_pending`); the alerts."""

    async def claim(self, target: str, now: float, lease_until: float, owner: str, batch: int
                    ) -> list[dict[str, Any]]:
        """The target's next due deliveries in order, leased to `owner`; none while its first one waits."""

    async def delivered(self, entry_id: str, target: str, now: float) -> None:
        """The target took it: out of the queue; the history says when."""

    async def failed(self, entry_id: str, target: str, retry_at: float, why: str) -> None:
        """Not taken: try again at `retry_at` (the lease ends)."""

    async def release(self, target: str, entry_ids: Sequence[str], owner: str) -> None:
        """Give leased deliveries back untried (an earlier one of their target failed first)."""

    async def history(self, account_id: str | None, limit: int) -> list[dict[str, Any]]:
        """The alerts raised (for one account, or all), newest first, with each target's delivery state."""

    async def counts(self) -> tuple[int, int]:
        """(deliveries waiting, deliveries dropped for the size bound)."""


class AuditSink(Protocol):
    """Where the audit trail's JSON lines go: files beside the vault (audit_file.AuditFile) or PostgreSQL
    (backends.pg_audit.PgAudit). Append-only and ordered; bounded by AMO_AUDIT_MAX_BYTES * (AMO_AUDIT_BACKUPS+1)."""

    @property
    def where(self) -> str:
        """Where the trail lives, for messages."""

    async def append(self, lines: Sequence[str]) -> None:
        """Append the lines durably, in order (raises OSError or StateUnavailable when it cannot)."""

    async def tail(self, limit: int | None) -> list[str]:
        """The last `limit` lines (all when None), oldest first."""
