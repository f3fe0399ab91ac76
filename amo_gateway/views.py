"""HTTP handlers: parse the request, call the flows or the token manager, shape the seed's answers."""

from __future__ import annotations

import functools
import json
from typing import Any

from aiohttp import web

from amo_gateway.accounts import account_summary, select_account
from amo_gateway.console.views import popup_response
from amo_gateway.errors import (
    BadRequest,
    ConsentDenied,
    GatewayError,
    NotConnected,
    NotFound,
    UpstreamUnauthorized,
)
from amo_gateway.flows import Connected
from amo_gateway.inputs import ExchangeBody, flag, json_body, query_param
from amo_gateway.typedefs import (
    AUDIT,
    AUTH,
    CLOCK,
    FLOWS,
    MANAGER,
    PROXY,
    REFRESHER,
    SETTINGS,
    STORE,
    TEST_CACHE,
)

EXCHANGE_ACCEPTED = {
    "message": "API key exchange request accepted",
    "status": "accepted",
    "note": "Authorization code will be sent to redirect URI",
}


async def exchange_api_key(request: web.Request) -> web.Response:
    """POST /exchange-api-key: the seed's step 1 (202 with the seed's exact JSON)."""
    request.app[AUTH].operator(request)
    body = await json_body(request, ExchangeBody)
    account = query_param(request, "account")
    with request.app[AUDIT].outcome("exchange.requested", "exchange.refused", secrets={"api_key": body.api_key},
                                    login=body.login, label=body.state, account=account):
        await request.app[FLOWS].exchange_api_key(body.login, body.api_key, body.state, account)
    return web.json_response(EXCHANGE_ACCEPTED, status=202)


async def callback(request: web.Request) -> web.Response:
    """GET /callback: amoCRM brings a code; answer the seed's JSON well inside amoCRM's 3 s."""
    code = query_param(request, "code")
    state = query_param(request, "state")
    popup = await request.app[FLOWS].for_popup(state)
    try:
        connected = await _connect(request, code, state)
    except GatewayError as err:
        if not popup:
            raise
        return popup_response(request, ok=False, code=err.code, status=err.status)
    request.app[REFRESHER].wake()
    request.app[TEST_CACHE].clear()
    if popup:  # the console's consent window: a page that tells the console and closes, not the seed's JSON
        return popup_response(request, ok=True, account_id=connected.account_id)
    body: dict[str, Any] = {
        "message": "AMO CRM successfully connected",
        "status": "success",
        "fromExchange": connected.from_exchange,
        "account_id": connected.account_id,
    }
    if connected.label is not None:
        body["state"] = connected.label
    return web.json_response(body)


async def _connect(request: web.Request, code: str | None, state: str | None) -> Connected:
    """The callback's work, audited: redeem the code at the account the state and referer name."""
    with request.app[AUDIT].outcome("callback.accepted", "callback.refused", secrets={"code": code, "state": state},
                                    referer=query_param(request, "referer")) as audit:
        code = _code_or_refusal(code, query_param(request, "error"))
        connected = await request.app[FLOWS].callback(
            code,
            state,
            query_param(request, "referer"),
            from_exchange=flag(request, "from_exchange"),
            from_widget=flag(request, "from_widget"),
        )
        audit.update(account=connected.account_id, from_exchange=connected.from_exchange, label=connected.label)
    return connected


def _code_or_refusal(code: str | None, error: str | None) -> str:
    """The code, or why there is none: amoCRM redirects with `error=access_denied` when the user pressed deny."""
    if error == "access_denied":
        raise ConsentDenied("the user declined the integration on amoCRM's consent page (error=access_denied); "
                            "nothing was connected")
    if error is not None:
        shown = error if error.isascii() and error.replace("_", "").isalnum() and len(error) <= 64 else "(unprintable)"
        raise ConsentDenied(f"amoCRM redirected without a code: error={shown}", code="authorization_failed")
    if code is None:
        raise BadRequest("query parameter 'code' is required", code="missing_parameter")
    return code


async def authorize(request: web.Request) -> web.Response:
    """GET /authorize: 302 to amoCRM's consent page with a fresh state."""
    request.app[AUTH].operator(request)
    url = await request.app[FLOWS].authorize_url(query_param(request, "label"))
    return web.json_response({"url": url}, status=302, headers={"Location": url})


async def token(request: web.Request) -> web.Response:
    """GET /token: the current access token for internal services; never the refresh token."""
    app = request.app  # a property walking the match info: once, on the hottest endpoint
    caller = app[AUTH].consumer_or_operator(request)
    account_id = await _account_id(app, request)
    pair = await app[MANAGER].access(account_id)
    audit = app[AUDIT]
    if audit.first_time(caller, account_id, pair.access_token):
        audit.record("token.issued", secrets={"access_token": pair.access_token}, consumer=caller, account=account_id)
    now = app[CLOCK].time()
    why = app[STORE].degraded()
    warning = {"Warning": f'199 amo-gateway "{why}: this is the token held in memory, valid until expires_at; '
                          'no refresh until the database is back"'} if why else None
    body = _token_body(pair.access_token, int(pair.expires_at), max(int(pair.expires_at - now), 0), account_id)
    return web.Response(body=body, content_type="application/json", charset="utf-8", headers=warning)


@functools.lru_cache(maxsize=64)
def _token_body(access_token: str, expires_at: int, expires_in: int, account_id: str) -> bytes:
    """/token's JSON, made once per token and second: callers poll it thousands of times a second (make bench)."""
    return json.dumps({"access_token": access_token, "token_type": "Bearer", "expires_at": expires_at,
                       "expires_in": expires_in, "account_id": account_id}).encode()


# What /test tells a caller without a bearer: is it alive, and until when. The account's id, subdomain and
# name identify the customer behind the public domain, so they need the operator's or a consumer's bearer.
PUBLIC_TEST_FIELDS = ("status", "expires_at", "expires_in")


async def test(request: web.Request) -> web.Response:
    """GET /test: is the connection alive? Calls /api/v4/account, cached briefly to spare amoCRM's 7 rps.

    Anyone gets `status` and the expiry; a bearer holder also gets the account's id, subdomain and name.
    """
    caller = request.app[AUTH].optional(request)
    account_id = await _account_id(request.app, request)
    await request.app[MANAGER].connected(account_id)  # not connected / reauth: said at once, never from cache
    seconds = request.app[SETTINGS].test_cache_seconds
    body = await request.app[TEST_CACHE].get_or_probe(account_id, lambda: _probe(request.app, account_id), seconds)
    if caller is None:
        body = {field: body[field] for field in PUBLIC_TEST_FIELDS}
    return web.json_response(body)


async def disconnect(request: web.Request) -> web.Response:
    """GET /disconnect: amoCRM's disconnect hook, signed with the client secret."""
    account_id = query_param(request, "account_id", required=True)
    client_uuid = query_param(request, "client_uuid", required=True)
    signature = query_param(request, "signature", required=True)
    assert account_id is not None and client_uuid is not None and signature is not None
    with request.app[AUDIT].outcome("disconnect.accepted", "disconnect.refused", account=account_id) as audit:
        removed = await request.app[FLOWS].disconnect(account_id, client_uuid, signature,
                                                       pace=lambda acc: _rate_slot(request.app, acc))
        audit.update(had_tokens=removed)
    request.app[TEST_CACHE].clear()
    request.app[REFRESHER].wake()
    return web.json_response({"status": "disconnected", "account_id": account_id, "had_tokens": removed})


async def accounts(request: web.Request) -> web.Response:
    """GET /accounts: every account's host, state, expiry, refresh-token age and last error (operator)."""
    request.app[AUTH].operator(request)
    data = await request.app[STORE].snapshot()
    now = request.app[CLOCK].time()
    return web.json_response({"accounts": [account_summary(a, now) for a in data.accounts.values()]})


async def proxy(request: web.Request) -> web.StreamResponse:
    """ANY /proxy/{path} and /accounts/{account}/proxy/{path}: amoCRM's API through the gateway (proxy.py)."""
    return await request.app[PROXY].handle(request)


async def _account_id(app: web.Application, request: web.Request) -> str:
    """The account the request names; a miss re-reads the vault only when its file changed on disk.

    Another process may have just added the account, but a stranger's random `?account=` must not make
    the gateway decrypt the vault at will: the recheck is one stat, the read happens only for a new file.
    A request without a query string (most `/token` polls) skips parsing one.
    """
    selector = query_param(request, "account") if request.query_string else None
    store = app[STORE]
    try:
        return select_account(await store.snapshot(), selector)
    except (NotFound, NotConnected):
        return select_account(await store.snapshot(recheck=True), selector)


async def _rate_slot(app: web.Application, account_id: str) -> None:
    """The probe counts against the account's amoCRM budget like a proxied call (found by the soak run:
    /test beside proxy traffic pushed amoCRM past 7 rps and got its 429s)."""
    proxy = app.get(PROXY)
    if proxy is not None:
        await proxy.limiters.get(account_id).acquire()


async def _probe(app: web.Application, account_id: str) -> dict[str, Any]:
    manager = app[MANAGER]
    pair = await manager.access(account_id)
    account = await manager.connected(account_id)
    try:
        await _rate_slot(app, account_id)
        info = await manager.client.account(account.base_url, pair.access_token)
    except UpstreamUnauthorized:  # the token died early: one refresh, one retry, within the proxy's 401 budget
        proxy = app[PROXY]  # anyone may call /test: it must not spend refresh tokens more freely than the proxy
        retry, spent = await proxy.after_401(account_id, pair.access_token)
        if not retry:
            raise
        pair = await manager.access(account_id)
        await _rate_slot(app, account_id)
        info = await manager.client.account(account.base_url, pair.access_token)
        if spent:
            await proxy.budget.reopen(account_id)
    now = app[CLOCK].time()
    return {
        "status": "connected",
        "account_id": str(info.get("id", account_id)),
        "subdomain": info.get("subdomain"),
        "name": info.get("name"),
        "expires_at": int(pair.expires_at),
        "expires_in": max(int(pair.expires_at - now), 0),
    }

