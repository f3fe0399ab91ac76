"""State backends behind one interface (base.StateStore): the vault file, or PostgreSQL (AMO_DATABASE_URL)."""

from __future__ import annotations

from collections.abc import Callable

from amo_gateway.backends.base import StateStore
from amo_gateway.settings import Settings
from amo_gateway.vault import KeyRing, Vault


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
