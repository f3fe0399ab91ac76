"""The application's typed keys, declared once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from amo_gateway.alerting import AlertService
from amo_gateway.audit import AuditLog
from amo_gateway.auth import Authenticator
from amo_gateway.backends.base import StateStore
from amo_gateway.cache import TestCache
from amo_gateway.clock import Clock
from amo_gateway.connections import ConnectionGuard
from amo_gateway.edge import Edge
from amo_gateway.flows import Flows
from amo_gateway.logs import AccessLog
from amo_gateway.manager import TokenManager
from amo_gateway.metrics import Metrics
from amo_gateway.proxy import Proxy
from amo_gateway.refresher import Refresher
from amo_gateway.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
CLOCK = web.AppKey("clock", Clock)
STORE: web.AppKey[StateStore] = web.AppKey("store")
AUTH = web.AppKey("auth", Authenticator)
HTTP_SESSION = web.AppKey("http_session", aiohttp.ClientSession)
MANAGER = web.AppKey("manager", TokenManager)
FLOWS = web.AppKey("flows", Flows)
REFRESHER = web.AppKey("refresher", Refresher)
TEST_CACHE = web.AppKey("test_cache", TestCache)
METRICS = web.AppKey("metrics", Metrics)
AUDIT = web.AppKey("audit", AuditLog)
PROXY = web.AppKey("proxy", Proxy)

# The alerts sent, newest last, for the console's "alerts sent" panel: `await history(account_id or None)` gives
# dicts with the alert body's fields (`event`, `account_id`, `subdomain`, `reason`, `at`) and a delivery
# `status`. Set by the alert outbox when there is one; the console says "no alerts recorded" without it.
AlertHistory = Callable[[str | None], Awaitable[list[dict[str, Any]]]]
ALERT_HISTORY: web.AppKey[AlertHistory] = web.AppKey("alert_history")

CONNECTIONS = web.AppKey("connections", ConnectionGuard)
EDGE = web.AppKey("edge", Edge)  # wraps every route's handler (routes.py); tests wrap theirs with it
ALERTS = web.AppKey("alerts", AlertService)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
