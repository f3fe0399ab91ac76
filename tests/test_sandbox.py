"""Tests of the amoCRM sandbox: it must enforce the upstream rules the gateway is tested against."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from amo_gateway.sandbox import SANDBOX_STATE, SandboxAccount, SandboxConfig, SandboxState, create_sandbox_app
from amo_gateway.sandbox.__main__ import config_from_args, parse_args

CLIENT_ID = "0f1e2d3c-client-id"
SECRET = "sandbox-client-secret"
REDIRECT = "https://gateway.example/api/v1/integrations/amo-crm/callback"
MAIN_ID, OTHER_ID = 31920194, 555
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
ServerFactory = Callable[..., Awaitable[TestServer]]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_config(**overrides: Any) -> SandboxConfig:
    """A two-account config: `demo` (default) and `other`."""
    accounts = [
        SandboxAccount(MAIN_ID, "demo", {"demo@example.com": "key-1"}, {"viewer@example.com"}, "Demo"),
        SandboxAccount(OTHER_ID, "other", {"boss@example.com": "key-2"}, set(), "Other"),
    ]
    values: dict[str, Any] = {"client_id": CLIENT_ID, "client_secret": SECRET, "redirect_uri": REDIRECT,
                              "accounts": accounts, "callback_delay": 0.01}
    values.update(overrides)
    return SandboxConfig(**values)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def start(aiohttp_client: ClientFactory, clock: FakeClock) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    """Start a sandbox on a loopback socket with a fake clock; overrides go to SandboxConfig."""

    async def _start(**overrides: Any) -> TestClient[Any, Any]:
        overrides.setdefault("clock", clock)
        return await aiohttp_client(create_sandbox_app(make_config(**overrides)))

    return _start


def state_of(client: TestClient[Any, Any]) -> SandboxState:
    assert client.app is not None
    state: SandboxState = client.app[SANDBOX_STATE]
    return state


async def code_grant(client: TestClient[Any, Any], code: str, host: str | None = None,
                     **over: str) -> aiohttp.ClientResponse:
    body = {"client_id": CLIENT_ID, "client_secret": SECRET, "grant_type": "authorization_code",
            "code": code, "redirect_uri": REDIRECT, **over}
    return await client.post("/oauth2/access_token", json=body, headers={"Host": host} if host else {})


async def refresh_grant(client: TestClient[Any, Any], token: str,
                        host: str | None = None) -> aiohttp.ClientResponse:
    body = {"client_id": CLIENT_ID, "client_secret": SECRET, "grant_type": "refresh_token",
            "refresh_token": token, "redirect_uri": REDIRECT}
    return await client.post("/oauth2/access_token", json=body, headers={"Host": host} if host else {})


async def connect(client: TestClient[Any, Any]) -> dict[str, Any]:
    """Run the code grant for the default account and return the token answer."""
    resp = await code_grant(client, state_of(client).issue_code(MAIN_ID))
    assert resp.status == 200
    data: dict[str, Any] = await resp.json()
    return data


async def problem(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """Assert a problem+json answer with the given status and return it."""
    assert resp.status == status
    assert resp.content_type == "application/problem+json"
    data: dict[str, Any] = await resp.json(content_type=None)
    assert set(data) >= {"hint", "title", "type", "status", "detail"} and data["status"] == status
    return data


def claims(access_token: str) -> dict[str, Any]:
    part = access_token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def bearer(token: str, host: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if host:
        headers["Host"] = host
    return headers


async def test_code_grant_returns_jwt_access_token_and_opaque_refresh(start: Any, clock: FakeClock) -> None:
    """A code grant answers 200 with a Bearer pair whose access token carries amoCRM's claims."""
    client = await start(access_ttl=3600)
    data = await connect(client)
    assert data["token_type"] == "Bearer" and data["expires_in"] == 3600
    assert data["server_time"] == int(clock.now)
    header = json.loads(base64.urlsafe_b64decode(data["access_token"].split(".")[0] + "=="))
    assert header == {"typ": "JWT", "alg": "RS256"}
    c = claims(data["access_token"])
    assert c["account_id"] == MAIN_ID and c["base_domain"] == "amocrm.ru" and c["client_uuid"] == CLIENT_ID
    assert c["exp"] == int(clock.now) + 3600 and c["iat"] == int(clock.now) and c["jti"]
    assert c["api_domain"] == f"{client.host}:{client.port}"
    assert "." not in data["refresh_token"] and len(data["refresh_token"]) > 200
    assert state_of(client).codes_redeemed == 1


async def test_api_domain_claim_comes_from_config_when_set(start: Any) -> None:
    """A configured api_domain is what the JWT's api_domain claim says."""
    client = await start(api_domain="api-b.amocrm.ru")
    assert claims((await connect(client))["access_token"])["api_domain"] == "api-b.amocrm.ru"


async def test_code_grant_accepts_a_form_body(start: Any) -> None:
    """The token endpoint reads form-encoded bodies as well as JSON."""
    client = await start()
    form = {"client_id": CLIENT_ID, "client_secret": SECRET, "grant_type": "authorization_code",
            "code": state_of(client).issue_code(MAIN_ID), "redirect_uri": REDIRECT}
    resp = await client.post("/oauth2/access_token", data=form)
    assert resp.status == 200 and (await resp.json())["token_type"] == "Bearer"


async def test_code_is_single_use(start: Any) -> None:
    """A spent code answers 400 `Authorization code has been revoked`."""
    client = await start()
    code = state_of(client).issue_code(MAIN_ID)
    assert (await code_grant(client, code)).status == 200
    data = await problem(await code_grant(client, code), 400)
    assert data["hint"] == "Authorization code has been revoked"


async def test_code_expires_after_code_ttl(start: Any, clock: FakeClock) -> None:
    """A code older than code_ttl answers 400 `Authorization code has expired`."""
    client = await start()
    code = state_of(client).issue_code(MAIN_ID)
    clock.advance(1201)
    assert (await problem(await code_grant(client, code), 400))["hint"] == "Authorization code has expired"


async def test_garbled_code_cannot_be_decrypted(start: Any) -> None:
    """An unknown code answers 400 `Cannot decrypt the authorization code`."""
    client = await start()
    data = await problem(await code_grant(client, "def50200garbage"), 400)
    assert data["hint"] == "Cannot decrypt the authorization code"


async def test_code_of_another_account_is_invalid_account(start: Any) -> None:
    """A code redeemed on another account's host answers 400 `Invalid account`."""
    client = await start()
    code = state_of(client).issue_code(OTHER_ID)
    resp = await client.post("/oauth2/access_token", json={
        "client_id": CLIENT_ID, "client_secret": SECRET, "grant_type": "authorization_code",
        "code": code, "redirect_uri": REDIRECT})
    assert (await problem(resp, 400))["hint"] == "Invalid account"


async def test_wrong_client_gets_401_with_russian_title(start: Any) -> None:
    """A wrong client secret or id answers 401 titled `Некорректный клиент`."""
    client = await start()
    code = state_of(client).issue_code(MAIN_ID)
    for wrong in ({"client_secret": "nope"}, {"client_id": "nope"}):
        assert (await problem(await code_grant(client, code, **wrong), 401))["title"] == "Некорректный клиент"
    assert (await code_grant(client, code)).status == 200


async def test_redirect_uri_must_match_exactly(start: Any) -> None:
    """A redirect_uri off by a trailing slash answers 400 `Redirect URI is not associated with client`."""
    client = await start()
    code = state_of(client).issue_code(MAIN_ID)
    data = await problem(await code_grant(client, code, redirect_uri=REDIRECT + "/"), 400)
    assert data["hint"] == "Redirect URI is not associated with client"


async def test_refresh_rotates_and_a_reused_token_is_revoked_and_counted(start: Any) -> None:
    """Each refresh kills the presented token; sending it again is 401 `Token has been revoked`, counted."""
    client = await start()
    state = state_of(client)
    first = (await connect(client))["refresh_token"]
    resp = await refresh_grant(client, first)
    assert resp.status == 200
    second = (await resp.json())["refresh_token"]
    assert second != first and state.live_refresh_token(MAIN_ID) == second
    assert (await problem(await refresh_grant(client, first), 401))["hint"] == "Token has been revoked"
    assert state.refresh_attempts == 2 and state.refresh_tokens_reused == 1
    assert (await refresh_grant(client, second)).status == 200
    assert state.refresh_tokens_reused == 1


async def test_unknown_refresh_token_is_revoked(start: Any) -> None:
    """A refresh token the sandbox never issued answers 401 `Token has been revoked`."""
    client = await start()
    data = await problem(await refresh_grant(client, "def50200made-up"), 401)
    assert data["hint"] == "Token has been revoked"


async def test_refresh_token_of_another_account_is_not_linked(start: Any) -> None:
    """A refresh token sent to another account's host answers 401 `Token is not linked to client`."""
    client = await start()
    token = (await connect(client))["refresh_token"]
    resp = await refresh_grant(client, token, host="other.amocrm.ru")
    assert (await problem(resp, 401))["hint"] == "Token is not linked to client"


async def test_refresh_token_expires_after_refresh_ttl(start: Any, clock: FakeClock) -> None:
    """A refresh token older than refresh_ttl is refused with 401."""
    client = await start(refresh_ttl=100)
    token = (await connect(client))["refresh_token"]
    clock.advance(101)
    await problem(await refresh_grant(client, token), 401)
    assert state_of(client).live_refresh_token(MAIN_ID) is None


async def test_previous_access_token_stays_valid_after_refresh(start: Any) -> None:
    """Refreshing does not kill the previous access token of the chain."""
    client = await start()
    pair = await connect(client)
    assert (await refresh_grant(client, pair["refresh_token"])).status == 200
    assert (await client.get("/api/v4/account", headers=bearer(pair["access_token"]))).status == 200


async def test_account_endpoint_answers_hal_json_or_401(start: Any, clock: FakeClock) -> None:
    """/api/v4/account answers 200 hal+json for a valid token and 401 problem+json otherwise."""
    client = await start(access_ttl=60)
    access = (await connect(client))["access_token"]
    resp = await client.get("/api/v4/account", headers=bearer(access))
    assert resp.status == 200 and resp.content_type == "application/hal+json"
    data = await resp.json(content_type=None)
    assert data["id"] == MAIN_ID and data["subdomain"] == "demo" and data["name"] == "Demo"
    assert {"current_user_id", "country", "currency"} <= set(data)
    await problem(await client.get("/api/v4/account"), 401)
    await problem(await client.get("/api/v4/account", headers=bearer(access + "x")), 401)
    await problem(await client.get("/api/v4/account", headers=bearer(access, "other.amocrm.ru")), 401)
    clock.advance(61)
    await problem(await client.get("/api/v4/account", headers=bearer(access)), 401)


async def test_api_echoes_what_the_proxy_sent(start: Any) -> None:
    """A call the sandbox does not model echoes method, path, query, body hash and headers (no Authorization)."""
    client = await start()
    access = (await connect(client))["access_token"]
    payload = b'[{"name": "deal"}]'
    headers = {**bearer(access), "X-Trace": "abc", "Content-Type": "application/json"}
    resp = await client.patch("/api/v4/echo/7?with=contacts&page=2", data=payload, headers=headers)
    assert resp.status == 200
    echo = await resp.json()
    assert echo["method"] == "PATCH" and echo["path"] == "/api/v4/echo/7"
    assert echo["query"] == "with=contacts&page=2"
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest() and echo["body_length"] == len(payload)
    assert echo["headers"]["X-Trace"] == "abc" and "Authorization" not in echo["headers"]
    await problem(await client.post("/api/v4/echo", json=[]), 401)


async def test_rate_limiter_answers_429_over_the_limit_per_second(start: Any, clock: FakeClock) -> None:
    """The eighth /api/v4 request within one second answers 429; the window slides."""
    client = await start()
    state = state_of(client)
    access = (await connect(client))["access_token"]
    statuses = [(await client.get("/api/v4/leads", headers=bearer(access))).status for _ in range(9)]
    assert statuses == [200] * 7 + [429, 429]
    assert state.rate_limited == 2 and state.max_requests_in_window(MAIN_ID) == 9
    assert state.max_requests_in_window(OTHER_ID) == 0
    clock.advance(1.0)
    resp = await client.get("/api/v4/account", headers=bearer(access))
    assert resp.status == 200
    assert state.api_requests == 10


async def test_max_requests_in_window_counts_any_one_second_span(start: Any, clock: FakeClock) -> None:
    """max_requests_in_window finds the busiest sliding window, not a calendar second."""
    client = await start()
    state = state_of(client)
    for step in (0.0, 0.5, 0.4, 0.2, 0.2, 0.5):
        clock.advance(step)
        state.record_api_arrival(MAIN_ID)
    assert state.max_requests_in_window(MAIN_ID) == 4
    assert state.max_requests_in_window(MAIN_ID, window=0.5) == 3


async def test_repeated_429s_ban_the_account_with_html_403(start: Any) -> None:
    """After ban_after 429s every request of that account answers a 403 HTML page; others go on."""
    client = await start(rate_limit=1, ban_after=2)
    state = state_of(client)
    access = (await connect(client))["access_token"]
    statuses = [(await client.get("/api/v4/leads", headers=bearer(access))).status for _ in range(4)]
    assert statuses == [200, 429, 429, 403]
    assert MAIN_ID in state.banned
    resp = await refresh_grant(client, state.live_refresh_token(MAIN_ID) or "")
    assert resp.status == 403 and resp.content_type == "text/html" and "nginx" in await resp.text()
    other = await client.post("/oauth2/access_token", json={}, headers={"Host": "other.amocrm.ru"})
    assert other.status == 401


async def test_drop_next_refresh_processes_the_grant_but_loses_the_answer(start: Any) -> None:
    """With drop_next_refresh the client sees a disconnect while the presented token is already spent."""
    client = await start()
    state = state_of(client)
    old = (await connect(client))["refresh_token"]
    state.drop_next_refresh = 1
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await refresh_grant(client, old)
    assert state.drop_next_refresh == 0
    new = state.live_refresh_token(MAIN_ID)
    assert new is not None and new != old
    assert (await problem(await refresh_grant(client, old), 401))["hint"] == "Token has been revoked"
    assert state.refresh_tokens_reused == 1
    assert (await refresh_grant(client, new)).status == 200


@pytest.mark.parametrize(("status", "content_type"), [
    (500, "application/problem+json"), (502, "text/html"), (503, "text/html"), (429, "text/plain")])
async def test_fail_next_answers_the_queued_statuses_once(start: Any, status: int, content_type: str) -> None:
    """A queued fault answers once in its body style, then the route works again."""
    client = await start()
    state = state_of(client)
    code = state.issue_code(MAIN_ID)
    state.fail_next["token"] = [status]
    resp = await code_grant(client, code)
    assert resp.status == status and resp.content_type == content_type
    assert (await code_grant(client, code)).status == 200
    assert state.fail_next["token"] == []


async def test_delay_switch_slows_a_route(start: Any) -> None:
    """A delay makes that route answer late, and a client timeout fires."""
    client = await start()
    state_of(client).delay["subdomain"] = 0.5
    with pytest.raises(asyncio.TimeoutError):
        await client.get("/oauth2/account/current/subdomain", timeout=aiohttp.ClientTimeout(total=0.1))
    state_of(client).delay.clear()
    assert (await client.get("/oauth2/account/current/subdomain")).status == 401


async def test_subdomain_endpoint_finds_the_account_of_a_live_refresh_token(start: Any) -> None:
    """X-Refresh-Token of a live token gives the account's subdomain; a spent one gives 401."""
    client = await start(base_domain="amocrm.ru")
    token = (await connect(client))["refresh_token"]
    resp = await client.get("/oauth2/account/current/subdomain", headers={"X-Refresh-Token": token})
    assert resp.status == 200
    assert await resp.json() == {"id": MAIN_ID, "subdomain": "demo", "domain": "demo.amocrm.ru",
                                 "top_level_domain": "ru"}
    assert (await refresh_grant(client, token)).status == 200
    spent = await client.get("/oauth2/account/current/subdomain", headers={"X-Refresh-Token": token})
    await problem(spent, 401)
    await problem(await client.get("/oauth2/account/current/subdomain"), 401)


async def test_host_header_selects_the_account(start: Any) -> None:
    """A Host whose first label is an account's subdomain reaches that account; others reach the default."""
    client = await start()
    state = state_of(client)
    resp = await code_grant(client, state.issue_code(OTHER_ID), host="other.amocrm.ru:443")
    assert resp.status == 200
    access = (await resp.json())["access_token"]
    assert claims(access)["account_id"] == OTHER_ID
    account = await (await client.get("/api/v4/account", headers=bearer(access, "other.amocrm.ru"))).json(
        content_type=None)
    assert account["id"] == OTHER_ID
    assert state.account_for_host("unknown.amocrm.ru").account_id == MAIN_ID
    assert state.account_for_host("127.0.0.1:8080").account_id == MAIN_ID
    assert state.account_for_host(None).account_id == MAIN_ID


async def test_exchange_answers_202_then_gets_the_redirect_uri(
        aiohttp_server: ServerFactory, aiohttp_client: ClientFactory) -> None:
    """A good exchange answers 202 with no body, then a server-to-server GET brings code, state, referer."""
    arrived: list[dict[str, str]] = []

    async def callback(request: web.Request) -> web.Response:
        arrived.append(dict(request.query))
        return web.Response(text="ok")

    gateway = web.Application()
    gateway.router.add_get("/callback", callback)
    server = await aiohttp_server(gateway)
    redirect = str(server.make_url("/callback"))
    client = await aiohttp_client(create_sandbox_app(make_config(redirect_uri=redirect)))
    state = state_of(client)
    resp = await client.post("/oauth2/exchange_api_key", json={
        "login": "demo@example.com", "api_key": "key-1", "client_uuid": CLIENT_ID,
        "client_secret": SECRET, "state": "st-1"})
    assert resp.status == 202 and await resp.read() == b""
    for _ in range(200):
        if state.callbacks and state.callbacks[-1]["status"] is not None:
            break
        await asyncio.sleep(0.01)
    assert len(arrived) == 1
    query = arrived[0]
    assert query["from_exchange"] == "1" and query["state"] == "st-1" and query["referer"] == "demo.amocrm.ru"
    assert state.callbacks[-1]["status"] == 200 and state.callbacks[-1]["body"] == "ok"
    token = await client.post("/oauth2/access_token", json={
        "client_id": CLIENT_ID, "client_secret": SECRET, "grant_type": "authorization_code",
        "code": query["code"], "redirect_uri": redirect})
    assert token.status == 200


async def test_exchange_callback_without_referer_when_disabled(
        aiohttp_server: ServerFactory, aiohttp_client: ClientFactory) -> None:
    """With send_referer=False the callback carries no referer; a failed delivery is recorded."""
    arrived: list[dict[str, str]] = []

    async def callback(request: web.Request) -> web.Response:
        arrived.append(dict(request.query))
        return web.Response(status=400, text="unknown state")

    gateway = web.Application()
    gateway.router.add_get("/cb", callback)
    server = await aiohttp_server(gateway)
    config = make_config(redirect_uri=str(server.make_url("/cb")), send_referer=False)
    client = await aiohttp_client(create_sandbox_app(config))
    state = state_of(client)
    resp = await client.post("/oauth2/exchange_api_key", json={
        "login": "demo@example.com", "api_key": "key-1", "client_uuid": CLIENT_ID, "client_secret": SECRET})
    assert resp.status == 202
    for _ in range(200):
        if state.callbacks and state.callbacks[-1]["status"] is not None:
            break
        await asyncio.sleep(0.01)
    assert "referer" not in arrived[0] and "state" not in arrived[0]
    assert state.callbacks[-1]["status"] == 400 and state.callbacks[-1]["body"] == "unknown state"


async def exchange(client: TestClient[Any, Any], login: str = "demo@example.com", api_key: str = "key-1",
                   **over: Any) -> aiohttp.ClientResponse:
    body = {"login": login, "api_key": api_key, "client_uuid": CLIENT_ID, "client_secret": SECRET, **over}
    return await client.post("/oauth2/exchange_api_key", json=body)


async def test_exchange_is_limited_to_once_per_five_minutes_per_login(start: Any, clock: FakeClock) -> None:
    """A second exchange within exchange_interval answers 429 plain text and does not reset the window."""
    client = await start(redirect_uri="http://127.0.0.1:9/cb", callback_delay=30)
    assert (await exchange(client)).status == 202
    clock.advance(200)
    resp = await exchange(client)
    assert resp.status == 429 and resp.content_type == "text/plain"
    assert await resp.text() == "Method is called too frequently"
    clock.advance(101)
    assert (await exchange(client)).status == 202
    assert state_of(client).exchange_calls == 3 and state_of(client).codes_issued == 2


async def test_exchange_refuses_a_forbidden_login_with_403(start: Any) -> None:
    """A login without rights answers 403 with a plain-text body."""
    client = await start()
    resp = await exchange(client, login="viewer@example.com", api_key="whatever")
    assert resp.status == 403 and resp.content_type == "text/plain"


async def test_exchange_rejects_bad_client_and_bad_data(start: Any) -> None:
    """A wrong client answers 401 problem; a wrong api_key, missing field or bad JSON answers 400."""
    client = await start()
    assert (await problem(await exchange(client, client_secret="x"), 401))["title"] == "Некорректный клиент"
    await problem(await exchange(client, api_key="wrong"), 400)
    await problem(await exchange(client, login=""), 400)
    await problem(await exchange(client, login="nobody@example.com"), 400)
    resp = await client.post("/oauth2/exchange_api_key", data=b"{not json",
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert state_of(client).codes_issued == 0


async def test_sandbox_stats_and_faults_endpoints(start: Any) -> None:
    """/_sandbox/faults sets switches over HTTP and /_sandbox/stats shows counters without token strings."""
    client = await start()
    pair = await connect(client)
    resp = await client.post("/_sandbox/faults", json={"fail_next": {"api": [503]}, "delay": {"token": 0.0},
                                                       "drop_next_refresh": 2, "banned": [OTHER_ID]})
    assert resp.status == 200
    state = state_of(client)
    assert state.fail_next == {"api": [503]} and state.drop_next_refresh == 2 and state.banned == {OTHER_ID}
    assert (await client.get("/api/v4/leads", headers=bearer(pair["access_token"]))).status == 503
    stats = await (await client.get("/_sandbox/stats")).json()
    assert stats["codes_issued"] == 1 and stats["codes_redeemed"] == 1 and stats["api_requests"] == 1
    assert stats["refresh_tokens_reused"] == 0
    assert stats["live_refresh_tokens"] == {str(MAIN_ID): 1, str(OTHER_ID): 0}
    assert pair["refresh_token"] not in json.dumps(stats) and pair["access_token"] not in json.dumps(stats)
    assert (await client.post("/_sandbox/faults", json={"clear": True, "banned": []})).status == 200
    assert state.fail_next == {} and state.drop_next_refresh == 0 and state.banned == set()
    assert (await client.post("/_sandbox/faults", data=b"[1]")).status == 400


async def test_sandbox_arrivals_give_the_times_of_api_calls_and_refreshes(start: Any, clock: FakeClock) -> None:
    """/_sandbox/arrivals: when each /api/v4 call and each refresh came, a reuse marked by its count."""
    client = await start()
    pair = await connect(client)
    await client.get("/api/v4/leads", headers=bearer(pair["access_token"]))
    clock.advance(0.25)
    await client.get("/api/v4/account", headers=bearer(pair["access_token"]))
    assert (await refresh_grant(client, pair["refresh_token"])).status == 200
    clock.advance(0.5)
    assert (await refresh_grant(client, pair["refresh_token"])).status == 401  # spent: presented a second time
    body = await (await client.get("/_sandbox/arrivals")).json()
    start_at = clock.now - 0.75
    assert body["api"] == {str(MAIN_ID): [start_at, start_at + 0.25]}
    assert body["refreshes"] == [[start_at + 0.25, 1], [start_at + 0.75, 2]]
    assert pair["refresh_token"] not in json.dumps(body)


async def test_sandbox_authorize_issues_a_code_and_the_browser_redirect(start: Any) -> None:
    """/_sandbox/authorize plays the consent click: a code, and the redirect with state and referer."""
    client = await start()
    resp = await client.post("/_sandbox/authorize", json={"state": "abc", "account_id": OTHER_ID})
    assert resp.status == 200
    data = await resp.json()
    assert data["redirect"].startswith(REDIRECT + "?code=")
    assert "state=abc" in data["redirect"] and "referer=other.amocrm.ru" in data["redirect"]
    token = await code_grant(client, data["code"], host="other.amocrm.ru")
    assert token.status == 200
    assert (await client.post("/_sandbox/authorize", json={"account_id": 1})).status == 400


async def test_sandbox_revoke_kills_the_accounts_tokens(start: Any) -> None:
    """/_sandbox/revoke kills every live refresh token (and access token) of the account."""
    client = await start()
    pair = await connect(client)
    resp = await client.post("/_sandbox/revoke", json={"account_id": MAIN_ID})
    assert (await resp.json())["revoked_refresh_tokens"] == 1
    state = state_of(client)
    assert state.live_refresh_token(MAIN_ID) is None and MAIN_ID in state.revoked_accounts
    data = await problem(await refresh_grant(client, pair["refresh_token"]), 401)
    assert data["hint"] == "Token has been revoked"
    await problem(await client.get("/api/v4/account", headers=bearer(pair["access_token"])), 401)


async def test_cleanup_cancels_pending_callbacks(aiohttp_server: ServerFactory) -> None:
    """Stopping the sandbox cancels callback deliveries still waiting for their delay."""
    config = make_config(redirect_uri="http://127.0.0.1:9/cb", callback_delay=60)
    app = create_sandbox_app(config)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        body = {"login": "demo@example.com", "api_key": "key-1", "client_uuid": CLIENT_ID, "client_secret": SECRET}
        resp = await session.post(server.make_url("/oauth2/exchange_api_key"), json=body)
        assert resp.status == 202
    await server.close()
    assert app[SANDBOX_STATE].callbacks == []


def test_cli_flags_build_a_one_account_config() -> None:
    """The standalone CLI's flags become a one-account SandboxConfig."""
    args = parse_args(["--client-id", "X", "--client-secret", "Y", "--redirect-uri", "http://gw/cb",
                       "--subdomain", "acme", "--access-ttl", "60", "--seed-entities", "40"])
    config = config_from_args(args)
    assert config.client_id == "X" and config.access_ttl == 60 and config.seed_entities == 40
    assert config.accounts[0].subdomain == "acme" and config.accounts[0].account_id == 31920194
    assert config.accounts[0].users == {"demo@example.com": "sandbox-api-key"}
