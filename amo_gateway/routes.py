"""The URL map: the seed's prefix for the public endpoints."""

from __future__ import annotations

from aiohttp import web

from amo_gateway import health, openapi, views
from amo_gateway.console import views as console
from amo_gateway.edge import CATCH_ALL, Edge, not_routed
from amo_gateway.settings import PREFIX


def setup_routes(app: web.Application, edge: Edge) -> None:
    """Every route's handler behind `edge`; the catch-all last, so that no path escapes it."""
    app.router.add_post(f"{PREFIX}/exchange-api-key", edge(views.exchange_api_key))
    app.router.add_get(f"{PREFIX}/callback", edge(views.callback))
    app.router.add_get(f"{PREFIX}/authorize", edge(views.authorize))
    app.router.add_get(f"{PREFIX}/test", edge(views.test))
    app.router.add_get(f"{PREFIX}/token", edge(views.token))
    app.router.add_get(f"{PREFIX}/disconnect", edge(views.disconnect))
    app.router.add_get(f"{PREFIX}/accounts", edge(views.accounts))
    # [\s\S], not `.`: a path holding an encoded newline must reach the proxy to be refused (and audited).
    app.router.add_route("*", PREFIX + r"/proxy/{path:[\s\S]*}", edge(views.proxy))
    # The per-account base URL: a library's base_url set here needs no header and no query of its own.
    app.router.add_route("*", PREFIX + r"/accounts/{account}/proxy/{path:[\s\S]*}", edge(views.proxy))
    app.router.add_get(f"{PREFIX}/console", edge(console.console))
    app.router.add_post(f"{PREFIX}/console/login", edge(console.login))
    app.router.add_post(f"{PREFIX}/console/logout", edge(console.logout))
    app.router.add_post(f"{PREFIX}/console/connect", edge(console.connect))
    app.router.add_post(f"{PREFIX}/console/exchange", edge(console.exchange))
    app.router.add_post(f"{PREFIX}/console/forget", edge(console.forget))
    app.router.add_get(f"{PREFIX}/console/static/{{name}}", edge(console.static))
    app.router.add_get("/healthz", edge(health.healthz))
    app.router.add_get("/readyz", edge(health.readyz))
    app.router.add_get("/metrics", edge(health.metrics))
    app.router.add_get("/openapi.json", edge(openapi.openapi_json))
    app.router.add_route("*", CATCH_ALL, edge(not_routed))
