"""Root endpoints for the machine room: `/healthz`, `/readyz`, `/metrics` (outside the public prefix)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from amo_gateway.accounts import display_state
from amo_gateway.errors import GatewayError
from amo_gateway.metrics import CONTENT_TYPE
from amo_gateway.tokens import CONNECTED, VaultData
from amo_gateway.typedefs import ALERTS, AUTH, CLOCK, METRICS, PROXY, STORE


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its loop answers; nothing else is checked."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when the vault decrypts and every stored account holds a usable token; 503 with the reason else."""
    try:
        data = await request.app[STORE].snapshot(recheck=True)
    except GatewayError as err:
        return web.json_response({"status": "not_ready", "reason": err.code, "detail": err.detail}, status=503)
    accounts = _accounts(data, request.app[CLOCK].time())
    if not accounts:
        return web.json_response({"status": "not_ready", "reason": "not_connected", "accounts": {}}, status=503)
    problems = [a["reason"] for a in accounts.values() if a["reason"]]
    body = {"status": "not_ready" if problems else "ready", "reason": problems[0] if problems else None,
            "accounts": accounts}
    return web.json_response(body, status=503 if problems else 200)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition; open without a bearer, and a bearer given must be the operator's."""
    if "Authorization" in request.headers:
        request.app[AUTH].operator(request)
    app = request.app
    proxy = app.get(PROXY)
    depths = proxy.limiters.depths() if proxy is not None else {}
    breakers = proxy.breakers.states() if proxy is not None else {}
    alerts = app.get(ALERTS)
    if alerts is not None:
        app[METRICS].set_outbox(*await alerts.outbox_counts())
    text = app[METRICS].render(await app[STORE].snapshot(), app[CLOCK].time(), depths, breakers)
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE})


def _accounts(data: VaultData, now: float) -> dict[str, dict[str, Any]]:
    """Per account: its status, seconds left on the access token, and why it is not usable (or None)."""
    out: dict[str, dict[str, Any]] = {}
    for account_id, account in data.accounts.items():
        tokens = account.tokens
        if tokens is None:
            reason: str | None = "not_connected"
        elif account.status != CONNECTED:
            reason = f"reauth_required: {account.reason}"
        elif tokens.expired(now, leeway=0):  # a long-lived token is never refreshed: expired is final
            reason = "long_lived_token_expired: import a new token" if account.long_lived else "access_token_expired"
        else:
            reason = None
        expires_in = max(int(tokens.expires_at - now), 0) if tokens is not None else None
        out[account_id] = {"status": display_state(account, now), "expires_in": expires_in, "reason": reason}
    return out
