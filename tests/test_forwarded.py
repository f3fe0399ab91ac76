"""Forwarded headers: believed from the configured proxy only, ignored from anyone else."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from amo_gateway.app import create_app
from amo_gateway.errors import ConfigError
from amo_gateway.forwarded import TrustedProxyForwarded
from amo_gateway.logs import AccessLog
from amo_gateway.serve import runner_options
from amo_gateway.settings import Settings
from amo_gateway.typedefs import EDGE
from amo_gateway.vault import KeyRing

FORGED = {"X-Forwarded-For": "203.0.113.66", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}


async def _whoami(request: web.Request) -> web.Response:
    """A test-only route: what the handlers see of the client."""
    return web.json_response({"remote": request.remote, "scheme": request.scheme, "host": request.host})


async def _gateway(aiohttp_client: Any, tmp_path: Path, keys: KeyRing, trusted: list[str],
                   access: io.StringIO | None = None) -> TestClient[Any, Any]:
    """The real gateway app (create_app), plus /_whoami, served with the gateway's own access log (into `access`)."""
    settings = Settings.model_validate({"vault_path": tmp_path / "vault" / "vault.enc", "trusted_proxies": trusted})
    sink = AccessLog(settings.log_format, access)
    app = create_app(settings, keys=keys, run_refresher=False, access_log=sink)
    app.router.add_get("/_whoami", app[EDGE](_whoami))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(**runner_options(settings, sink))
    client: TestClient[Any, Any] = await aiohttp_client(server)
    return client


async def _access_remotes(client: TestClient[Any, Any], access: io.StringIO) -> list[str]:
    """The `remote` of every access line, once the server stopped (its cleanup writes what is pending)."""
    await client.close()
    return [json.loads(line)["remote"] for line in access.getvalue().splitlines() if '"http.access"' in line]


async def test_forwarded_headers_from_the_trusted_proxy_name_the_client(
        aiohttp_client: Any, tmp_path: Path, keys: KeyRing, caplog: pytest.LogCaptureFixture) -> None:
    """From 127.0.0.1 (the default proxy), X-Forwarded-For/-Proto become request.remote and .scheme."""
    access = io.StringIO()
    client = await _gateway(aiohttp_client, tmp_path, keys, ["127.0.0.1", "::1"], access)
    with caplog.at_level(logging.INFO):
        resp = await client.get("/_whoami", headers=FORGED)
        seen = await resp.json()
    assert seen == {"remote": "203.0.113.66", "scheme": "https", "host": "evil.example"}
    assert await _access_remotes(client, access) == ["203.0.113.66"]


async def test_forged_forwarded_headers_from_an_untrusted_peer_are_ignored(
        aiohttp_client: Any, tmp_path: Path, keys: KeyRing, caplog: pytest.LogCaptureFixture) -> None:
    """With the proxy configured elsewhere, a forged X-Forwarded-For changes neither request.remote nor the log."""
    access = io.StringIO()
    client = await _gateway(aiohttp_client, tmp_path, keys, ["192.0.2.10"], access)
    with caplog.at_level(logging.INFO):
        resp = await client.get("/_whoami", headers=FORGED)
        seen = await resp.json()
    assert seen["remote"] == "127.0.0.1"
    assert seen["scheme"] == "http"
    assert seen["host"] != "evil.example"
    assert await _access_remotes(client, access) == ["127.0.0.1"]


@pytest.mark.parametrize(("header", "field"), [("X-Forwarded-For", "remote"), ("X-Forwarded-Proto", "scheme"),
                                               ("x-forwarded-host", "host")])
async def test_each_forwarded_header_alone_is_applied(
        aiohttp_client: Any, tmp_path: Path, keys: KeyRing, header: str, field: str) -> None:
    """Any one of the three, in any case, is enough for the proxy's headers to be believed (applies())."""
    client = await _gateway(aiohttp_client, tmp_path, keys, ["127.0.0.1"])
    resp = await client.get("/_whoami", headers={header: FORGED[header.title()]})
    assert (await resp.json())[field] == {"remote": "203.0.113.66", "scheme": "https", "host": "evil.example"}[field]


async def test_trusted_peer_without_forwarded_headers_is_served_as_itself(
        aiohttp_client: Any, tmp_path: Path, keys: KeyRing) -> None:
    """A local scrape or curl from the proxy host, with no X-Forwarded-For, is answered, not refused."""
    client = await _gateway(aiohttp_client, tmp_path, keys, ["127.0.0.1"])
    resp = await client.get("/_whoami")
    assert resp.status == 200
    assert (await resp.json())["remote"] == "127.0.0.1"


async def test_malformed_forwarded_for_from_the_proxy_is_a_json_400(
        aiohttp_client: Any, tmp_path: Path, keys: KeyRing) -> None:
    """A trusted peer sending a non-address X-Forwarded-For gets the gateway's JSON error shape."""
    client = await _gateway(aiohttp_client, tmp_path, keys, ["127.0.0.1"])
    resp = await client.get("/_whoami", headers={"X-Forwarded-For": "not-an-address"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "bad_request"


def test_trusted_proxies_accept_networks_and_ipv4_mapped_peers() -> None:
    """`10.0.0.0/8` covers its members; a dual-stack listener's ::ffff:127.0.0.1 counts as 127.0.0.1."""
    forwarded = TrustedProxyForwarded(["10.0.0.0/8", "127.0.0.1"])
    assert forwarded.peer_is_trusted("10.20.30.40")
    assert forwarded.peer_is_trusted("::ffff:127.0.0.1")
    assert not forwarded.peer_is_trusted("11.0.0.1")
    assert not forwarded.peer_is_trusted("")
    assert not forwarded.peer_is_trusted(None)


def test_a_bad_trusted_proxy_entry_stops_start_up_naming_the_setting() -> None:
    """A typo in AMO_TRUSTED_PROXIES is a ConfigError that names the variable, not a silent no-trust."""
    with pytest.raises(ConfigError, match="AMO_TRUSTED_PROXIES"):
        TrustedProxyForwarded(["127.0.0.1", "nginx.local"])
