"""The URL map: the seed's prefix for the public endpoints, every handler behind the edge (edge.py)."""

from __future__ import annotations

from aiohttp import web

from amo_gateway import health, openapi, views
from amo_gateway.console import views as console
from amo_gateway.edge import CATCH_ALL, Edge, not_routed
from amo_gateway.settings import PREFIX

ROUTES = (
    web.post(f"{PREFIX}/exchange-api-key", views.exchange_api_key),
    web.get(f"{PREFIX}/callback", views.callback),
    web.get(f"{PREFIX}/authorize", views.authorize),
    web.get(f"{PREFIX}/test", views.test),
    web.get(f"{PREFIX}/token", views.token),
    web.get(f"{PREFIX}/disconnect", views.disconnect),
    web.get(f"{PREFIX}/accounts", views.accounts),
    # [\s\S], not `.`: a path holding an encoded newline must reach the proxy to be refused (and audited).
    web.route("*", PREFIX + r"/proxy/{path:[\s\S]*}", views.proxy),
    # The per-account base URL: a library's base_url set here needs no header and no query of its own.
    web.route("*", PREFIX + r"/accounts/{account}/proxy/{path:[\s\S]*}", views.proxy),
    web.get(f"{PREFIX}/console", console.console),
    web.post(f"{PREFIX}/console/login", console.login),
    web.post(f"{PREFIX}/console/logout", console.logout),
    web.post(f"{PREFIX}/console/connect", console.connect),
    web.post(f"{PREFIX}/console/exchange", console.exchange),
    web.post(f"{PREFIX}/console/forget", console.forget),
    web.get(f"{PREFIX}/console/static/{{name}}", console.static),
    web.get("/healthz", health.healthz),
    web.get("/readyz", health.readyz),
    web.get("/metrics", health.metrics),
    web.get("/openapi.json", openapi.openapi_json),
)


def setup_routes(app: web.Application, edge: Edge) -> None:
    """ROUTES, each handler wrapped in `edge`, then the catch-all, so that no request escapes the edge."""
    app.add_routes([web.RouteDef(r.method, r.path, edge(r.handler), r.kwargs) for r in ROUTES])
    app.router.add_route("*", CATCH_ALL, edge(not_routed))
