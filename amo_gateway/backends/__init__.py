"""State backends behind one interface (base.StateStore, with base.OutboxStore and base.AuditSink beside it):
the vault file and the files beside it, or PostgreSQL (AMO_DATABASE_URL)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from amo_gateway.backends.base import AuditSink, OutboxStore, StateStore
from amo_gateway.refresh_budget import RefreshBudget
from amo_gateway.settings import Settings
from amo_gateway.vault import KeyRing, Vault

if TYPE_CHECKING:
    from amo_gateway.backends.postgres import PgStore


def open_store(settings: Settings, keys: KeyRing, key_source: Callable[[], KeyRing] | None) -> StateStore:
    """PostgreSQL when AMO_DATABASE_URL is set, else the vault file exactly as before (not yet opened)."""
    url = settings.secret("database_url")
    if url:
        from amo_gateway.backends.postgres import PgStore  # psycopg is imported only where it is used

        return PgStore(url, keys, key_source, lease_seconds=refresh_lease(settings))
    from amo_gateway.store import Store

    return Store(Vault(settings.vault_path, keys), key_source)


def refresh_lease(settings: Settings) -> float:
    """How long a replica's refresh claim holds: longer than the longest refresh it can be in (three amoCRM
    calls when an account moved, each bounded by AMO_UPSTREAM_TIMEOUT), so a replica cut off from the
    database mid-refresh is never overtaken by another sending the same refresh token."""
    return 3 * settings.upstream_timeout + 5.0


def open_outbox(settings: Settings, store: StateStore) -> OutboxStore:
    """The alert outbox beside the state: the database's tables (on the store's pool), or `<vault>.alerts`."""
    if settings.secret("database_url"):
        from amo_gateway.backends.pg_outbox import PgOutbox

        return PgOutbox(_pg(store).pool)
    from amo_gateway.outbox import Outbox, outbox_path

    return Outbox(outbox_path(settings.vault_path))


def open_audit(settings: Settings, store: StateStore) -> AuditSink:
    """The audit trail beside the state: the database's `amo_audit` (on the store's pool), or `audit.log`."""
    from amo_gateway.audit import audit_path
    from amo_gateway.audit_file import AuditFile, audit_rotation

    if settings.secret("database_url"):
        from amo_gateway.backends.pg_audit import PgAudit

        return PgAudit(_pg(store).pool, audit_rotation(settings))
    return AuditFile(audit_path(settings.vault_path), audit_rotation(settings))


def open_refresh_budget(settings: Settings, store: StateStore) -> RefreshBudget:
    """The proxy's budget of 401-triggered refreshes: every replica's in the database, else this process's."""
    if settings.secret("database_url"):
        from amo_gateway.backends.pg_budget import SharedRefreshBudget

        return SharedRefreshBudget(_pg(store).pool, settings.proxy_refresh_interval)
    return RefreshBudget(settings.proxy_refresh_interval)


@contextlib.asynccontextmanager
async def standalone_audit(settings: Settings) -> AsyncIterator[AuditSink]:
    """The audit trail for a command-line tool, without a gateway's store (its own connection, closed after)."""
    from amo_gateway.audit import audit_path
    from amo_gateway.audit_file import AuditFile, audit_rotation

    url = settings.secret("database_url")
    if url:
        from amo_gateway.backends.pg_audit import standalone

        async with standalone(url, audit_rotation(settings)) as sink:
            yield sink
    else:
        yield AuditFile(audit_path(settings.vault_path), audit_rotation(settings))


def _pg(store: StateStore) -> PgStore:
    from amo_gateway.backends.postgres import PgStore

    if not isinstance(store, PgStore):
        raise TypeError("AMO_DATABASE_URL is set but the state store is not PostgreSQL")
    return store
