"""The URL map: the seed's prefix for the public endpoints."""

from __future__ import annotations

from aiohttp import web

from amo_gateway import health, openapi, views
from amo_gateway.console import views as console
from amo_gateway.settings import PREFIX


def setup_routes(app: web.Application) -> None:
    app.router.add_post(f"{PREFIX}/exchange-api-key", views.exchange_api_key)
    app.router.add_get(f"{PREFIX}/callback", views.callback)
    app.router.add_get(f"{PREFIX}/authorize", views.authorize)
    app.router.add_get(f"{PREFIX}/test", views.test)
    app.router.add_get(f"{PREFIX}/token", views.token)
    app.router.add_get(f"{PREFIX}/disconnect", views.disconnect)
    app.router.add_get(f"{PREFIX}/accounts", views.accounts)
    # [\s\S], not `.`: a path holding an encoded newline must reach the proxy to be refused (and audited).
    app.router.add_route("*", PREFIX + r"/proxy/{path:[\s\S]*}", views.proxy)
    # The per-account base URL: a library's base_url set here needs no header and no query of its own.
    app.router.add_route("*", PREFIX + r"/accounts/{account}/proxy/{path:[\s\S]*}", views.proxy)
    app.router.add_get(f"{PREFIX}/console", console.console)
    app.router.add_post(f"{PREFIX}/console/login", console.login)
    app.router.add_post(f"{PREFIX}/console/logout", console.logout)
    app.router.add_post(f"{PREFIX}/console/connect", console.connect)
    app.router.add_post(f"{PREFIX}/console/exchange", console.exchange)
    app.router.add_post(f"{PREFIX}/console/forget", console.forget)
    app.router.add_get(f"{PREFIX}/console/static/{{name}}", console.static)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/openapi.json", openapi.openapi_json)
