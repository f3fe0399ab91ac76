"""Application assembly: every resource and background task is a cleanup_ctx."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver

from amo_gateway.alerting import AlertService
from amo_gateway.alerts import check_settings
from amo_gateway.amo_client import AmoClient
from amo_gateway.audit import AuditLog, audit_ctx_body, audit_key
from amo_gateway.auth import Authenticator
from amo_gateway.backends import open_audit, open_outbox, open_refresh_budget, open_store
from amo_gateway.cache import TestCache
from amo_gateway.clock import Clock, SystemClock
from amo_gateway.connections import ConnectionGuard, descriptor_cap
from amo_gateway.edge import Edge
from amo_gateway.flows import Flows
from amo_gateway.forwarded import TrustedProxyForwarded
from amo_gateway.logs import AccessLog, event
from amo_gateway.manager import SHARED_BATCH, Outcome, TokenManager
from amo_gateway.metrics import Metrics
from amo_gateway.proxy import Proxy
from amo_gateway.refresher import Refresher
from amo_gateway.routes import setup_routes
from amo_gateway.settings import Settings
from amo_gateway.typedefs import (
    ACCESS_LOG,
    ALERT_HISTORY,
    ALERTS,
    AUDIT,
    AUTH,
    CLOCK,
    CONNECTIONS,
    EDGE,
    FLOWS,
    HTTP_SESSION,
    MANAGER,
    METRICS,
    PROXY,
    REFRESHER,
    SETTINGS,
    STORE,
    TEST_CACHE,
    AlertHistory,
)
from amo_gateway.upstream import UpstreamPool
from amo_gateway.vault import KeyRing, load_keyring
from amo_gateway.webhook import targets

log = logging.getLogger("amo_gateway.app")


def create_app(settings: Settings, *, clock: Clock | None = None, keys: KeyRing | None = None,
               run_refresher: bool = True, resolver: AbstractResolver | None = None,
               access_log: AccessLog | None = None) -> web.Application:
    """The gateway app; `clock`, `keys` and the DNS `resolver` are parameters so tests hand in their own.

    `access_log` is the sink its runner's access logger writes to (serve.runner_options); the app writes out
    what is pending when it stops, after its last request.
    """
    metrics = Metrics()
    guard = ConnectionGuard(descriptor_cap(settings.max_connections), settings.header_timeout, metrics)
    edge = Edge(guard, TrustedProxyForwarded(settings.trusted_proxies))
    app = web.Application(client_max_size=settings.max_body_bytes)  # no middleware: see edge.py
    app[EDGE] = edge
    app[CONNECTIONS] = guard
    app[SETTINGS] = settings
    app[ACCESS_LOG] = access_log or AccessLog(settings.log_format)
    app.cleanup_ctx.append(app[ACCESS_LOG].lifetime)
    app[CLOCK] = clock or SystemClock()
    app[AUTH] = Authenticator.from_settings(settings)
    app[TEST_CACHE] = TestCache()
    def key_source() -> KeyRing:
        return load_keyring(settings.vault_key_file, os.environ.get("CREDENTIALS_DIRECTORY"),
                            settings.secret("vault_key"))

    keyring = keys or key_source()
    app.cleanup_ctx.append(_store_ctx(settings, keyring, None if keys else key_source))
    app.cleanup_ctx.append(_http_ctx(resolver))
    app[METRICS] = metrics
    app[AUDIT] = AuditLog(audit_key(keyring), merge_seconds=settings.audit_merge_seconds)
    app.cleanup_ctx.append(_audit_ctx)
    app.cleanup_ctx.append(_services_ctx)
    app.cleanup_ctx.append(_proxy_ctx(resolver))
    if settings.alerts_enabled:
        check_settings(settings)
        app.cleanup_ctx.append(_alerts_ctx(run_refresher))
        history: AlertHistory = functools.partial(_alert_history, app)
        app[ALERT_HISTORY] = history
    if run_refresher:
        app.cleanup_ctx.append(_refresher_ctx)
    setup_routes(app, edge)
    return app


def _store_ctx(settings: Settings, keys: KeyRing, key_source: Callable[[], KeyRing] | None):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        """Open the shared state: a vault that does not decrypt (or a database out of reach) stops start-up here."""
        store = open_store(settings, keys, key_source)
        if settings.database_url is not None:  # AMO_VAULT_PATH's directory exists in both modes (dev mode uses it)
            await asyncio.to_thread(settings.vault_path.parent.mkdir, mode=0o700, parents=True, exist_ok=True)
        await store.open()
        app[STORE] = store
        try:
            yield
        finally:
            await store.close()

    return ctx


async def _audit_ctx(app: web.Application) -> AsyncIterator[None]:
    """The audit trail's writer, on the trail beside the state (after the store context, which opens it)."""
    app[AUDIT].sink = open_audit(app[SETTINGS], app[STORE])
    async for _ in audit_ctx_body(app[AUDIT]):
        yield


def _proxy_ctx(resolver: AbstractResolver | None):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        """The proxy's own keep-alive connections to amoCRM (upstream.py: no cookies, bodies left compressed)."""
        upstream = UpstreamPool(resolver=resolver)
        manager, audit = app[MANAGER], app[AUDIT]
        manager.observers.append(app[METRICS].observe_refresh)
        manager.observers.append(lambda outcome: _audit_refresh(audit, outcome))
        app[PROXY] = Proxy(app[SETTINGS], upstream, manager, app[AUTH], app[METRICS], audit=audit,
                           budget=open_refresh_budget(app[SETTINGS], app[STORE]))
        try:
            yield
        finally:
            await upstream.close()

    return ctx


def _audit_refresh(audit: AuditLog, outcome: Outcome) -> None:
    """Refreshes that changed something go to the audit trail; skips do not."""
    if outcome.result == "skipped":
        return
    fresh = outcome.pair.refresh_token if outcome.pair is not None else None
    audit.record("refresh", account=outcome.account_id, outcome=outcome.result, reason=outcome.reason,
                 error=outcome.error.code if outcome.error else None, secrets={"refresh_token": fresh})


async def _alert_history(app: web.Application, account_id: str | None) -> list[dict[str, Any]]:
    """The console's "alerts sent": the outbox's history, oldest first, with one delivery status per alert."""
    service = app.get(ALERTS)
    if service is None:
        return []
    rows = await service.history(account_id, limit=25)
    return [{**row, "status": _delivery_status(row.get("targets") or {})} for row in reversed(rows)]


def _delivery_status(targets: dict[str, str]) -> str:
    """delivered when every target took it, else the least advanced state (pending, failed, dropped)."""
    states = set(targets.values())
    return "delivered" if states == {"delivered"} else sorted(states - {"delivered"})[0] if states else "pending"


def _alerts_ctx(run_loop: bool):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        """Alerts: hooked to refresh outcomes and breakers before the refresher starts; one check before serving.

        The check at start-up turns whatever state the vault was left in (a crash between a re-authorization
        and its alert) into alerts before anything else happens; the outbox keeps those not yet delivered.
        """
        settings = app[SETTINGS]
        outbox = open_outbox(settings, app[STORE])
        aside = await outbox.prepare()
        if aside is not None:
            event(log, "alerts.outbox_unreadable", level=logging.ERROR, kept_as=aside)
        timeout = aiohttp.ClientTimeout(total=settings.alert_timeout)
        async with aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": "amo-gateway-alerts"}) as session:
            proxy = app[PROXY]
            service = AlertService(settings, app[STORE], outbox, targets(settings), app[CLOCK], app[METRICS],
                                   session, proxy.breakers.states)
            app[ALERTS] = service
            app[MANAGER].observers.append(service.observe_refresh)
            proxy.breakers.listeners.append(service.breaker_changed)
            try:
                await service.check()
            except Exception as err:  # never stops the gateway; the loop's first round checks again
                event(log, "alerts.error", level=logging.ERROR, error=type(err).__name__)
            task = asyncio.create_task(service.run(), name="amo-gateway-alerts") if run_loop else None
            yield
            service.stop()
            if task is not None:
                try:
                    await asyncio.wait_for(task, timeout=settings.alert_timeout + 1)
                except TimeoutError:
                    pass  # cancelled by wait_for; its lease lets another process (or the next start) resend it

    return ctx


def _http_ctx(resolver: AbstractResolver | None):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        """The one ClientSession of the process: amoCRM's OAuth and account calls (the proxy has its own pool).

        Each connection closes after its answer (`force_close`): every account lives on its own host, so pooled
        connections are never reused across accounts, and a refresh storm over N accounts would otherwise hold
        N idle sockets for 15 s (past the unit's LimitNOFILE=8192 with 10 000 accounts). The cost is one TCP/TLS
        handshake per OAuth call, a few per account a day.
        """
        connector = aiohttp.TCPConnector(resolver=resolver, force_close=True)
        async with aiohttp.ClientSession(headers={"User-Agent": "amo-gateway"}, connector=connector) as session:
            app[HTTP_SESSION] = session
            yield

    return ctx


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    """The amoCRM client, the token manager and the flows; on the way out, let sent refreshes land."""
    settings = app[SETTINGS]
    client = AmoClient(
        app[HTTP_SESSION],
        client_id=settings.client_id or "",
        client_secret=settings.secret("client_secret") or "",
        redirect_uri=settings.redirect_uri or "",
        timeout=settings.upstream_timeout,
    )
    store = app[STORE]
    locks = store.refresh_locks()
    app[MANAGER] = TokenManager(store, client, locks, app[CLOCK], margin=settings.refresh_margin,
                                url_template=settings.account_url_template,
                                base_domains=settings.allowed_base_domains,
                                batch_size=SHARED_BATCH if settings.database_url is not None else None)
    app[FLOWS] = Flows(settings, store, client, app[CLOCK])
    app[REFRESHER] = Refresher(app[MANAGER], app[CLOCK], margin=settings.refresh_margin)
    yield
    try:
        await asyncio.wait_for(app[MANAGER].drain(), timeout=settings.shutdown_timeout)
    except TimeoutError:  # the vault's in-flight marker lets the next start judge what became of it
        event(log, "shutdown.refresh_abandoned", level=logging.ERROR, waited_seconds=settings.shutdown_timeout)
    locks.close()


async def _refresher_ctx(app: web.Application) -> AsyncIterator[None]:
    """The background refresher: stopped gently so a refresh in flight is stored, not cut."""
    refresher = app[REFRESHER]
    task = asyncio.create_task(refresher.run(), name="amo-gateway-refresher")
    yield
    refresher.stop()
    try:
        await asyncio.wait_for(task, timeout=app[SETTINGS].shutdown_timeout)
    except TimeoutError:
        pass  # wait_for has cancelled it; drain() below the services context still awaits sent refreshes
