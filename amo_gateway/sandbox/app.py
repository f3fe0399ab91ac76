"""The sandbox's aiohttp app: amoCRM's OAuth, exchange and /api/v4 endpoints, plus /_sandbox controls."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from amo_gateway.sandbox.config import SandboxAccount, SandboxConfig
from amo_gateway.sandbox.crm_api import add_entity_routes, bearer_account, compressed, validation_problem
from amo_gateway.sandbox.entities import ValidationFailed, self_link
from amo_gateway.sandbox.state import ROUTES, SANDBOX_STATE, OAuthProblem, SandboxState

CLIENT_TITLE = "Некорректный клиент"
CALLBACK_TIMEOUT = aiohttp.ClientTimeout(total=3)
HTML_TEMPLATE = ("<html>\r\n<head><title>{s} {r}</title></head>\r\n<body>\r\n"
                 "<center><h1>{s} {r}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
ACCOUNT_CARD: dict[str, Any] = {
    "created_at": 1577836800, "created_by": 0, "updated_at": 1577836800, "updated_by": 0, "country": "RU",
    "currency": "RUB", "currency_symbol": "₽", "customers_mode": "disabled", "is_unsorted_on": True,
    "mobile_feature_version": 0, "is_loss_reason_enabled": True, "is_helpbot_enabled": False,
    "is_technical_account": False, "contact_name_display_order": 1}
REASONS = {s.value: s.phrase for s in HTTPStatus}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class _Runtime:
    """The callback client and its pending tasks (set up by the cleanup context)."""

    session: aiohttp.ClientSession | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


_RUNTIME = web.AppKey("sandbox_runtime", _Runtime)


def _html(status: int) -> web.Response:
    """An nginx-like HTML error page."""
    text = HTML_TEMPLATE.format(s=status, r=REASONS.get(status, "Error"))
    return web.Response(status=status, text=text, content_type="text/html")


def _problem(problem: OAuthProblem) -> web.Response:
    """Render a problem as application/problem+json."""
    text = json.dumps(problem.body(), ensure_ascii=False)
    return web.Response(text=text, status=problem.status, content_type="application/problem+json")


def _fault(status: int) -> web.Response:
    """The answer for a queued fault: plain text 429, HTML 403/502/503/504, problem+json otherwise."""
    if status == 429:
        return web.Response(status=429, text="Too Many Requests")
    if status in (403, 502, 503, 504):
        return _html(status)
    reason = REASONS.get(status, "Error")
    return _problem(OAuthProblem(status, "Sandbox fault", title=reason, detail="Injected by the sandbox"))


@web.middleware
async def _upstream_rules(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Apply the ban, the test switches and the /api/v4 rate limit; render OAuthProblem as problem+json."""
    route = (request.match_info.route.name or "").partition(":")[0]  # `api:list` and the rest count as `api`
    if route not in ROUTES:
        return await handler(request)
    state = request.app[SANDBOX_STATE]
    if state.unknown_account_host(request.host):  # e.g. the old subdomain of a renamed account
        return _problem(OAuthProblem(404, "Account not found", title="Not Found", detail="Unknown account host"))
    account_id = state.account_for_host(request.host).account_id
    state.hits[route] += 1
    is_api = route in ("account", "api")
    if is_api:
        state.record_api_arrival(account_id)
    if account_id in state.banned:
        return _html(403)
    if seconds := state.delay.get(route):
        await asyncio.sleep(seconds)
    if (status := state.pop_fault(route)) is not None:
        return _fault(status)
    if is_api and not state.admit(account_id):
        return web.Response(status=429, text="Too Many Requests")
    try:
        return await handler(request)
    except OAuthProblem as problem:
        return _problem(problem)
    except ValidationFailed as failed:
        return validation_problem(failed)


async def _read_body(request: web.Request, *, form: bool) -> dict[str, Any]:
    """The request's JSON object (or form fields when allowed); 400 when malformed."""
    if form and request.content_type != "application/json":
        return {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    try:
        data = await request.json()
    except ValueError:
        raise OAuthProblem(400, "Invalid JSON body") from None
    if not isinstance(data, dict):
        raise OAuthProblem(400, "Invalid JSON body")
    return data


def _required(data: dict[str, Any], name: str) -> str:
    """A non-empty string field, else league's `Check the ... parameter` 400."""
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise OAuthProblem(400, f"Check the `{name}` parameter")
    return value


def _check_client(config: SandboxConfig, client_id: Any, client_secret: Any) -> None:
    """401 `Некорректный клиент` unless the integration's id and secret match."""
    ok_id = isinstance(client_id, str) and secrets.compare_digest(client_id, config.client_id)
    ok_secret = isinstance(client_secret, str) and secrets.compare_digest(
        client_secret.encode(), config.client_secret.encode())
    if not (ok_id and ok_secret):
        raise OAuthProblem(401, "Client authentication failed", title=CLIENT_TITLE,
                           detail="Client authentication failed")


async def _token(request: web.Request) -> web.StreamResponse:
    """POST /oauth2/access_token: the code and refresh grants."""
    state, data = request.app[SANDBOX_STATE], await _read_body(request, form=True)
    _check_client(state.config, data.get("client_id"), data.get("client_secret"))
    grant = data.get("grant_type")
    if grant not in ("authorization_code", "refresh_token"):
        raise OAuthProblem(400, "Check the `grant_type` parameter", detail="Unsupported grant type")
    if data.get("redirect_uri") != state.config.redirect_uri:
        raise OAuthProblem(400, "Redirect URI is not associated with client")
    account = state.account_for_host(request.host)
    if grant == "authorization_code":
        return web.json_response(state.redeem_code(_required(data, "code"), account, request.host).body())
    pair = state.refresh(_required(data, "refresh_token"), account, request.host)
    if state.take_drop() and request.transport is not None:
        request.transport.abort()  # processed, but the answer is lost: writing it fails quietly
    return web.json_response(pair.body())


async def _exchange(request: web.Request) -> web.StreamResponse:
    """POST /oauth2/exchange_api_key: 202 now, the code later by a server-to-server GET."""
    state = request.app[SANDBOX_STATE]
    state.exchange_calls += 1
    data = await _read_body(request, form=False)
    _check_client(state.config, data.get("client_uuid"), data.get("client_secret"))
    login, api_key, state_param = _required(data, "login"), _required(data, "api_key"), data.get("state")
    if state_param is not None and not isinstance(state_param, str):
        raise OAuthProblem(400, "Check the `state` parameter")
    account = state.account_for_host(request.host)
    if login in account.forbidden_logins:
        return web.Response(status=403, text="Forbidden: the user has no rights for this action")
    if not secrets.compare_digest(account.users.get(login, "").encode(), api_key.encode()):
        raise OAuthProblem(400, "Invalid login or api_key")
    if not state.take_exchange_slot(account.account_id, login):
        return web.Response(status=429, text="Method is called too frequently")
    code = state.issue_code(account.account_id)
    _schedule(request.app, _deliver(request.app, account, code, state_param))
    return web.Response(status=202)


def _schedule(app: web.Application, coro: Awaitable[None]) -> None:
    """Run a callback delivery in the background, tracked for cleanup."""
    tasks = app[_RUNTIME].tasks
    task: asyncio.Task[None] = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _deliver(app: web.Application, account: SandboxAccount, code: str, state_param: str | None) -> None:
    """After callback_delay, GET redirect_uri?code=…&from_exchange=1 and record the gateway's answer."""
    state, session = app[SANDBOX_STATE], app[_RUNTIME].session
    config = state.config
    await asyncio.sleep(config.callback_delay)
    query = {"code": code, "from_exchange": "1"}
    if state_param is not None:
        query["state"] = state_param
    if config.send_referer:
        query["referer"] = config.account_host(account)
    record: dict[str, Any] = {"kind": "exchange", "account_id": account.account_id, "code": code,
                              "state": state_param, "referer": query.get("referer"), "at": state.clock(),
                              "status": None, "body": None, "error": None}
    state.callbacks.append(record)
    assert session is not None, "the cleanup context owns the session while the app runs"
    try:
        url = URL(config.redirect_uri).extend_query(query)
        async with session.get(url, allow_redirects=False, timeout=CALLBACK_TIMEOUT) as resp:
            record["body"] = (await resp.read()).decode("utf-8", "replace")[:4000]
            record["status"] = resp.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"


async def _account(request: web.Request) -> web.StreamResponse:
    """GET /api/v4/account: the account's card as HAL+JSON."""
    account = bearer_account(request)
    body = {"id": account.account_id, "name": account.name, "subdomain": account.subdomain,
            "current_user_id": account.current_user_id, **ACCOUNT_CARD,
            "_links": self_link(f"{request.scheme}://{request.host}", "/api/v4/account")}
    return compressed(request, web.json_response(body, content_type="application/hal+json"))


async def _api(request: web.Request) -> web.StreamResponse:
    """Any /api/v4 call the sandbox does not model (e.g. /api/v4/echo): an echo of what arrived."""
    bearer_account(request)
    raw = await request.read()
    body: dict[str, Any] = {
        "method": request.method, "path": request.path, "query": request.query_string,
        "body_sha256": hashlib.sha256(raw).hexdigest(), "body_length": len(raw),
        "headers": {k: v for k, v in request.headers.items() if k.lower() != "authorization"}}
    return compressed(request, web.json_response(body))


async def _subdomain(request: web.Request) -> web.StreamResponse:
    """GET /oauth2/account/current/subdomain: the account of a live X-Refresh-Token."""
    state = request.app[SANDBOX_STATE]
    account = state.refresh_account(request.headers.get("X-Refresh-Token", "").strip())
    if account is None:
        raise OAuthProblem(401, "Token has been revoked", detail="The refresh token is invalid.")
    return web.json_response({"id": account.account_id, "subdomain": account.subdomain,
                              "domain": state.config.account_host(account),
                              "top_level_domain": state.config.base_domain.rsplit(".", 1)[-1]})


async def _control_body(request: web.Request) -> dict[str, Any]:
    """A control endpoint's JSON object; an empty body is `{}`."""
    if not await request.read():
        return {}
    try:
        return await _read_body(request, form=False)
    except OAuthProblem as problem:
        raise web.HTTPBadRequest(text=problem.hint) from None


def _control_account(state: SandboxState, data: dict[str, Any]) -> SandboxAccount:
    """The account named by `account_id`, or the default one; 400 when unknown."""
    raw = data.get("account_id")
    account = state.config.accounts[0] if raw is None else state.account(raw if isinstance(raw, int) else -1)
    if account is None:
        raise web.HTTPBadRequest(text=f"unknown account_id {raw}")
    return account


async def _stats(request: web.Request) -> web.StreamResponse:
    """GET /_sandbox/stats: counters and switches."""
    return web.json_response(request.app[SANDBOX_STATE].stats())


async def _arrivals(request: web.Request) -> web.StreamResponse:
    """GET /_sandbox/arrivals: the arrival times of /api/v4 requests per account and of refreshes."""
    return web.json_response(request.app[SANDBOX_STATE].arrivals())


async def _faults(request: web.Request) -> web.StreamResponse:
    """POST /_sandbox/faults: set fail_next, delay, drop_next_refresh, banned, unauthorized_paths (or clear)."""
    state = request.app[SANDBOX_STATE]
    try:
        state.set_switches(await _control_body(request))
    except (TypeError, ValueError) as exc:
        raise web.HTTPBadRequest(text=f"bad switches: {exc}") from None
    return web.json_response({k: v for k, v in state.stats().items()
                              if k in ("fail_next", "delay", "drop_next_refresh", "banned", "unauthorized_paths")})


async def _authorize(request: web.Request) -> web.StreamResponse:
    """POST /_sandbox/authorize: a user clicked "Allow"; return the code and the browser redirect."""
    state, data = request.app[SANDBOX_STATE], await _control_body(request)
    account = _control_account(state, data)
    code = state.issue_code(account.account_id)
    query = {"code": code}
    if data.get("state") is not None:
        query["state"] = str(data["state"])
    query["referer"] = state.config.account_host(account)
    redirect = URL(state.config.redirect_uri).extend_query(query)
    return web.json_response({"code": code, "redirect": str(redirect), "account_id": account.account_id})


async def _consent(request: web.Request) -> web.StreamResponse:
    """GET /oauth: the consent page, auto-approved (a test tool has nobody to click "Allow")."""
    state = request.app[SANDBOX_STATE]
    if request.query.get("client_id") != state.config.client_id:
        raise web.HTTPBadRequest(text="unknown client_id")
    raw = request.query.get("account_id", "")
    account = _control_account(state, {"account_id": int(raw)} if raw.isdigit() else {})
    query = {"code": state.issue_code(account.account_id)}
    if "state" in request.query:
        query["state"] = request.query["state"]
    # The account host; when the sandbox is reached by address (make run), that address is the account host.
    on_ip = not request.host.split(":")[0].endswith(state.config.base_domain)
    query["referer"] = request.host if on_ip else state.config.account_host(account)
    raise web.HTTPFound(URL(state.config.redirect_uri).extend_query(query))


async def _revoke(request: web.Request) -> web.StreamResponse:
    """POST /_sandbox/revoke: the user disconnected the integration; its tokens die."""
    state, data = request.app[SANDBOX_STATE], await _control_body(request)
    account = _control_account(state, data)
    killed = state.revoke(account.account_id, access=bool(data.get("access", True)))
    return web.json_response({"account_id": account.account_id, "revoked_refresh_tokens": killed})


async def _callback_client(app: web.Application) -> AsyncIterator[None]:
    """Own the callback ClientSession; on cleanup cancel and await pending deliveries."""
    runtime = app[_RUNTIME]
    runtime.session = aiohttp.ClientSession()
    try:
        yield
    finally:
        tasks = list(runtime.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runtime.session.close()
        runtime.session = None


def create_sandbox_app(config: SandboxConfig) -> web.Application:
    """Build the sandbox app; `app[SANDBOX_STATE]` is its live state."""
    app = web.Application(middlewares=[_upstream_rules])
    app[SANDBOX_STATE] = SandboxState(config)
    app[_RUNTIME] = _Runtime()
    app.cleanup_ctx.append(_callback_client)
    router = app.router
    router.add_post("/oauth2/access_token", _token, name="token")
    router.add_post("/oauth2/exchange_api_key", _exchange, name="exchange")
    router.add_get("/oauth2/account/current/subdomain", _subdomain, name="subdomain")
    router.add_get("/api/v4/account", _account, name="account")
    add_entity_routes(router)  # before the echo, which takes whatever they leave
    router.add_route("*", "/api/v4/{tail:.*}", _api, name="api")
    router.add_get("/_sandbox/stats", _stats)
    router.add_get("/_sandbox/arrivals", _arrivals)
    router.add_post("/_sandbox/faults", _faults)
    router.add_post("/_sandbox/authorize", _authorize)
    router.add_post("/_sandbox/revoke", _revoke)
    router.add_get("/oauth", _consent)
    return app
