"""What the gateway refuses (issue 9): forged account moves, bad input, unsafe configuration, stale tokens."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from amo_gateway.sandbox import SandboxAccount
from amo_gateway.typedefs import REFRESHER
from tests.conftest import ACCOUNT_ID, API_KEY, LOGIN, FakeClock, Rig, RigFactory

ACME_ID = 555000
FORGER_HOST = "api-forged.amocrm.ru"


class SplitResolver(AbstractResolver):
    """amoCRM hosts resolve to the sandbox (127.0.0.1), the forged api_domain to 127.0.0.3, the rest to 127.0.0.2."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        if host == FORGER_HOST:
            address = "127.0.0.3"
        elif host.endswith((".amocrm.ru", ".amocrm.com", ".kommo.com")):
            address = "127.0.0.1"
        else:
            address = "127.0.0.2"
        return [{"hostname": host, "host": address, "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        return None


async def _serve(handler: Any, host: str, port: int) -> AsyncIterator[list[str]]:
    """A loopback server on host:port answering with `handler`; yields the request lines it received."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(f"{request.method} {request.path}")
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app, host=host, port=port)
    await server.start_server()
    try:
        yield seen
    finally:
        await server.close()


async def _moved_account_rig(make_rig: RigFactory, clock: FakeClock) -> tuple[Rig, SandboxAccount, int]:
    """ACME connected through the sandbox (hosts mapped by the URL template), then renamed so its host 404s."""
    acme = SandboxAccount(ACME_ID, "acme")
    rig = await make_rig(clock=clock, run_refresher=False, resolver=SplitResolver(), any_account=True,
                         account_url_template="http://{{host}}:{sandbox_port}", sandbox_api_domain="api-b.amocrm.ru",
                         sandbox_accounts=[SandboxAccount(ACCOUNT_ID, "demo", {LOGIN: API_KEY}), acme],
                         sandbox_access_ttl=3600, refresh_margin=600)
    await _consent(rig, ACME_ID)
    acme.subdomain = "acme-renamed"
    return rig, acme, int(rig.sandbox_url.rsplit(":", 1)[1])


async def _consent(rig: Rig, account_id: int) -> None:
    resp = await rig.client.get(rig.url("/authorize"), headers=rig.admin, allow_redirects=False)
    state = resp.headers["Location"].split("state=")[1].split("&")[0]
    async with rig.client.session.post(f"{rig.sandbox_url}/_sandbox/authorize",
                                       json={"state": state, "account_id": account_id}) as allow:
        redirect = (await allow.json())["redirect"]
    answer = await rig.client.get("/" + redirect.split("/", 3)[3])
    assert answer.status == 200, await answer.text()


def _set_api_domain(rig: Rig, api_domain: str) -> str:
    """What a forged `api_domain` claim would leave in the vault; returns the account's host before."""
    def change(data: Any) -> str:
        account = data.accounts[str(ACME_ID)]
        data.accounts[str(ACME_ID)] = replace(account, api_domain=api_domain)
        return str(account.base_url)

    return rig.vault().update(change)[0]


@pytest.mark.parametrize(
    ("api_domain", "answered_domain"),
    [
        ("evil.example.com", None),  # the claim itself points away from amoCRM: the refresh token must not go
        ("127.0.0.2", None),
        (FORGER_HOST, "evil.example.com"),  # an amoCRM-shaped api_domain answering a foreign host
        (FORGER_HOST, "127.0.0.2"),
        (FORGER_HOST, "acme.amocrm.ru.evil.com"),
    ],
)
async def test_account_move_to_a_host_off_the_allow_list_sends_nothing_and_keeps_the_host(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture, api_domain: str, answered_domain: str | None
) -> None:
    """A forged api_domain or a forged move answer: the listener gets nothing, the host stays, a warning says why."""
    clock = FakeClock()
    rig, _, port = await _moved_account_rig(make_rig, clock)
    old_host = _set_api_domain(rig, api_domain)

    async def forged(request: web.Request) -> web.Response:
        return web.json_response({"id": ACME_ID, "subdomain": "evil", "domain": answered_domain})

    async def listener_answer(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "x", "refresh_token": "y", "expires_in": 3600,
                                  "domain": "evil.example.com"})

    listener = _serve(listener_answer, "127.0.0.2", port)
    forger = _serve(forged, "127.0.0.3", port)
    received, asked = await anext(listener), await anext(forger)
    try:
        with caplog.at_level(logging.WARNING, logger="amo_gateway.refresh"):
            clock.advance(3100)
            await rig.app[REFRESHER].tick()
    finally:
        await listener.aclose()
        await forger.aclose()
    assert received == [], "a host outside the allow-list was contacted"
    data, _ = rig.vault().read()
    assert data.accounts[str(ACME_ID)].base_url == old_host
    assert "account.move_refused" in caplog.text
    assert asked == ([] if answered_domain is None else ["GET /oauth2/account/current/subdomain"])
