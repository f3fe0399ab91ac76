"""What the gateway refuses (issue 9): forged account moves, bad input, unsafe configuration, stale tokens."""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from cryptography.fernet import Fernet

from amo_gateway.accounts import base_url_for_referer
from amo_gateway.audit import audit_path
from amo_gateway.audit_file import append_lines
from amo_gateway.errors import ConfigError, RefererRefused, VaultError
from amo_gateway.flows import Flows
from amo_gateway.locks import RefreshLocks
from amo_gateway.sandbox import SandboxAccount
from amo_gateway.settings import Settings, load_settings
from amo_gateway.store import Store
from amo_gateway.tokens import Account, TokenPair
from amo_gateway.typedefs import AUDIT, REFRESHER
from amo_gateway.vault import KeyRing, Vault
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


# --- Bad input that used to reach a 500 or a traceback -------------------------------------------------------


async def _issued_state(rig: Rig) -> str:
    resp = await rig.client.get(rig.url("/authorize"), headers=rig.admin, allow_redirects=False)
    return resp.headers["Location"].split("state=")[1].split("&")[0]


async def _audit_events(rig: Rig) -> list[dict[str, Any]]:
    await rig.app[AUDIT].flush()
    path = audit_path(rig.settings.vault_path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("referer", ["[", "ex\uff0fample", "[x.y", "acme.amocrm.ru]"])
async def test_unparsable_referer_with_a_valid_state_is_refused_and_audited(rig: Rig, referer: str) -> None:
    """`referer=[` or a fullwidth solidus: 400 referer_refused (was a 500), audited, the state still usable."""
    state = await _issued_state(rig)
    resp = await rig.client.get(rig.url("/callback"), params={"code": "c0de", "state": state, "referer": referer})
    assert (resp.status, (await resp.json())["error"]) == (400, "referer_refused")
    refused = [e for e in await _audit_events(rig) if e["event"] == "callback.refused"]
    assert [e["reason"] for e in refused] == ["referer_refused"]
    assert rig.sandbox.hits["token"] == 0
    data, _ = rig.vault().read()
    assert len(data.states) == 1, "a refused referer does not use up the state"


async def test_exchange_for_an_unparsable_account_host_is_a_4xx(rig: Rig) -> None:
    """`exchange-api-key?account=%5Bx.y` is refused before amoCRM is called (was a 500)."""
    resp = await rig.client.post(rig.url("/exchange-api-key?account=%5Bx.y"),
                                 json={"login": LOGIN, "api_key": API_KEY}, headers=rig.admin)
    assert (resp.status, (await resp.json())["error"]) == (400, "account_not_allowed")
    assert rig.sandbox.hits["exchange"] == 0


async def test_callback_with_access_denied_says_the_user_declined(rig: Rig) -> None:
    """The user pressed deny: 400 consent_denied saying so (was reported as a missing code), audited."""
    state = await _issued_state(rig)
    resp = await rig.client.get(rig.url("/callback"), params={"error": "access_denied", "state": state})
    body = await resp.json()
    assert (resp.status, body["error"]) == (400, "consent_denied")
    assert "declined" in body["detail"]
    assert [e["reason"] for e in await _audit_events(rig) if e["event"] == "callback.refused"] == ["consent_denied"]
    resp = await rig.client.get(rig.url("/callback"), params={"error": "<script>", "state": state})
    body = await resp.json()
    assert (resp.status, body["error"]) == (400, "authorization_failed")
    assert "<script>" not in body["detail"]


@pytest.mark.parametrize("host", ["\u0430cme.amocrm.ru", "ac_me.amocrm.ru", "-acme.amocrm.ru", "xn--acme-.amocrm.ru"])
def test_account_hosts_are_ascii_dns_labels(host: str) -> None:
    """A look-alike (a Cyrillic a) or malformed subdomain never becomes an account host, even with any_account."""
    with pytest.raises(RefererRefused):
        base_url_for_referer(host, Settings(any_account=True))


def test_referer_naming_amo_domain_is_accepted_when_base_url_points_at_a_stand_in() -> None:
    """AMO_BASE_URL reaches a stand-in; amoCRM still sends `referer=demo.amocrm.ru` (AMO_DOMAIN): accepted."""
    settings = Settings(domain="demo.amocrm.ru", base_url="http://127.0.0.1:8099")
    assert base_url_for_referer("demo.amocrm.ru", settings) == "http://127.0.0.1:8099"
    assert base_url_for_referer("127.0.0.1:8099", settings) == "http://127.0.0.1:8099"
    with pytest.raises(RefererRefused):
        base_url_for_referer("other.amocrm.ru", settings)


async def test_callback_with_amo_domain_referer_reaches_the_stand_in(make_rig: RigFactory) -> None:
    """End to end: AMO_BASE_URL = the sandbox, AMO_DOMAIN = demo.amocrm.ru, amoCRM's referer: connected."""
    rig = await make_rig(domain="demo.amocrm.ru")
    state = await _issued_state(rig)
    code = rig.sandbox.issue_code(ACCOUNT_ID)
    resp = await rig.client.get(rig.url("/callback"),
                                params={"code": code, "state": state, "referer": "demo.amocrm.ru"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["account_id"] == str(ACCOUNT_ID)


# --- Start-up and CLI: one line naming the cause, never a traceback ------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AMO_") and k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "amo_gateway", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, input=stdin, timeout=60, check=False)


def _cli_env(tmp_path: Path) -> dict[str, str]:
    key_file = tmp_path / "vault-key"
    key_file.write_text(Fernet.generate_key().decode() + "\n")
    return {"AMO_VAULT_KEY_FILE": str(key_file), "AMO_VAULT_PATH": str(tmp_path / "state" / "vault.enc")}


def _one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("amo-gateway: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_start_up_with_the_port_in_use_names_host_port_and_setting(tmp_path: Path) -> None:
    """Port taken: one line naming 127.0.0.1:<port> and AMO_GATEWAY_PORT, no traceback."""
    env = _cli_env(tmp_path) | {"AMO_DOMAIN": "acme.amocrm.ru", "AMO_CLIENT_ID": "x", "AMO_CLIENT_SECRET": "y",
                                "AMO_REDIRECT_URI": "https://gw.example.com/cb", "AMO_ADMIN_TOKEN": "t"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _cli("serve", env=env | {"AMO_GATEWAY_PORT": str(port)})
    _one_line_error(result, f"127.0.0.1:{port}", "AMO_GATEWAY_PORT")


def test_unreadable_credential_file_is_one_line_naming_it(tmp_path: Path) -> None:
    """A credential that cannot be read as text: one line naming the file, no traceback."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "client-secret").write_bytes(b"\xff\xfe\x00secret")
    result = _cli("status", env=_cli_env(tmp_path) | {"CREDENTIALS_DIRECTORY": str(creds)})
    _one_line_error(result, str(creds / "client-secret"))
    assert "secret" not in result.stderr.replace("client-secret", "")


def test_unreadable_vault_key_credential_is_one_line_naming_it(tmp_path: Path) -> None:
    """The vault-key credential is read elsewhere (vault.py), with the same rule."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "vault-key").write_bytes(b"\xff\xfe")
    env = {"AMO_VAULT_PATH": str(tmp_path / "state" / "vault.enc"), "CREDENTIALS_DIRECTORY": str(creds)}
    _one_line_error(_cli("status", env=env), str(creds / "vault-key"))


def test_import_token_with_a_missing_file_is_one_line(tmp_path: Path) -> None:
    """import-token of a file that is not there: one line naming it, no traceback."""
    missing = tmp_path / "no-such-token"
    _one_line_error(_cli("import-token", str(missing), "--host", "acme.amocrm.ru", env=_cli_env(tmp_path)),
                    str(missing))


def _jwt(claims: dict[str, Any]) -> str:
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJSUzI1NiJ9.{part}.c2lnbmF0dXJl"


def test_import_token_refuses_an_expired_token(tmp_path: Path) -> None:
    """A long-lived token already past its exp is refused, not stored as 'connected'."""
    token = _jwt({"account_id": 4242, "exp": int(time.time()) - 60})
    result = _cli("import-token", "-", "--host", "acme.amocrm.ru", env=_cli_env(tmp_path), stdin=token + "\n")
    _one_line_error(result, "expired")
    assert not (tmp_path / "state" / "vault.enc").exists()


@pytest.mark.parametrize("host", ["evil.example.com", "127.0.0.1:8099", "acme.amocrm.ru.evil.com", "www.amocrm.ru"])
def test_import_token_refuses_a_host_outside_the_allow_list(tmp_path: Path, host: str) -> None:
    """--host must be {sub}.{amoCRM/Kommo base domain}: the token would be sent there with every call."""
    token = _jwt({"account_id": 4242, "exp": int(time.time()) + 86400})
    result = _cli("import-token", "-", "--host", host, env=_cli_env(tmp_path), stdin=token + "\n")
    _one_line_error(result, "not an amoCRM/Kommo account host")
    assert not (tmp_path / "state" / "vault.enc").exists()


# --- Configuration that must be refused ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "home"),
    [("client_secret", "client-secret"), ("admin_token", "admin-token"), ("vault_key", "AMO_VAULT_KEY_FILE"),
     ("consumer_tokens", "consumer-tokens")],
)
def test_config_file_holding_a_secret_stops_start_up(tmp_path: Path, key: str, home: str) -> None:
    """A secret in config.yaml: start-up stops naming the key and where it belongs; the value is never echoed."""
    path = tmp_path / "config.yaml"
    path.write_text(f"port: 8080\n{key}: do-not-show-this\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert repr(key) in caught.value.detail and home in caught.value.detail
    assert "do-not-show-this" not in caught.value.detail


def test_config_file_with_a_secret_stops_serve_in_one_line(tmp_path: Path) -> None:
    """The same through the command: exit 2, one line."""
    path = tmp_path / "config.yaml"
    path.write_text("client_secret: do-not-show-this\n")
    result = _cli("serve", "--config", str(path), env=_cli_env(tmp_path))
    _one_line_error(result, "'client_secret'", "/etc/amo-gateway/client-secret")
    assert "do-not-show-this" not in result.stderr


@pytest.mark.parametrize(
    ("text", "where"),
    [("port: 8080\nhost: [127.0.0.1\n", "line 3, column 1"), ("port: 8080\n  host: x\n", "line 2, column 7"),
     ("a: 1\n\tb: 2\n", "line 2, column 1")],
)
def test_yaml_errors_give_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    """A YAML syntax error names the file, the problem, and its 1-based line and column."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert str(path) in caught.value.detail and where in caught.value.detail, caught.value.detail


# --- Stale long-lived tokens and planted symlinks ------------------------------------------------------------


def _store_long_lived(vault: Vault, expires_at: float) -> None:
    pair = TokenPair(_jwt({"account_id": 4242, "exp": int(expires_at)}), None, expires_at, expires_at - 86400 * 30)
    account = Account("4242", "https://acme.amocrm.ru", pair, long_lived=True, subdomain="acme")
    vault.update(lambda data: data.accounts.__setitem__("4242", account))


async def test_expired_long_lived_token_is_not_ready_and_shown_expired(make_rig: RigFactory) -> None:
    """Past its exp: /readyz 503 with the reason; /accounts says `expired` with expires_in 0, not `connected`."""
    clock = FakeClock()
    rig = await make_rig(clock=clock, run_refresher=False)
    _store_long_lived(rig.vault(), clock.time() + 600)
    assert (await rig.client.get("/readyz")).status == 200
    clock.advance(900)
    ready = await rig.client.get("/readyz")
    body = await ready.json()
    assert (ready.status, body["reason"].split(":")[0]) == (503, "long_lived_token_expired")
    assert body["accounts"]["4242"]["status"] == "expired" and body["accounts"]["4242"]["expires_in"] == 0
    listed = (await (await rig.client.get(rig.url("/accounts"), headers=rig.admin)).json())["accounts"]
    assert [(a["state"], a["access_expires_in"]) for a in listed] == [("expired", 0)]


def test_status_shows_an_expired_long_lived_token_as_expired(tmp_path: Path) -> None:
    """`amo-gateway status`: the state column says expired (the token is never refreshed)."""
    env = _cli_env(tmp_path)
    vault = Vault(Path(env["AMO_VAULT_PATH"]), KeyRing.parse(Path(env["AMO_VAULT_KEY_FILE"]).read_text()))
    vault.prepare()
    _store_long_lived(vault, time.time() - 60)
    rows = json.loads(_cli("status", "--json", env=env).stdout)
    assert [(r["state"], r["access_expires_in"]) for r in rows] == [("expired", 0)]
    table = _cli("status", env=env).stdout
    assert "expired" in table and "connected" not in table


def test_symlinked_vault_path_stops_start_up(tmp_path: Path) -> None:
    """AMO_VAULT_PATH a symlink: reads would follow it and the first write fork it; start-up refuses it."""
    env = _cli_env(tmp_path)
    vault_path = Path(env["AMO_VAULT_PATH"])
    vault_path.parent.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.enc"
    elsewhere.write_bytes(b"x")
    vault_path.symlink_to(elsewhere)
    env |= {"AMO_DOMAIN": "acme.amocrm.ru", "AMO_CLIENT_ID": "x", "AMO_CLIENT_SECRET": "y",
            "AMO_REDIRECT_URI": "https://gw.example.com/cb", "AMO_ADMIN_TOKEN": "t", "AMO_GATEWAY_PORT": "0"}
    _one_line_error(_cli("serve", env=env), str(vault_path), "symbolic link")
    assert vault_path.is_symlink() and elsewhere.read_bytes() == b"x"


def test_planted_lock_file_symlinks_are_refused(tmp_path: Path, keys: KeyRing) -> None:
    """The vault's flock file and the refresh lock file are opened with O_NOFOLLOW: a planted link is refused."""
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    vault = Vault(tmp_path / "state" / "vault.enc", keys)
    vault.path.parent.mkdir(mode=0o700)
    vault.lock_path.symlink_to(target)
    with pytest.raises(VaultError, match="symbolic link"):
        vault.prepare()
    refresh_lock = tmp_path / "state" / "vault.enc.refresh.lock"
    refresh_lock.symlink_to(target)
    with pytest.raises(VaultError, match="symbolic link"):
        RefreshLocks(refresh_lock)
    assert target.read_bytes() == b"untouched"


def test_planted_audit_symlink_is_never_written_through(tmp_path: Path) -> None:
    """audit.log is opened with O_NOFOLLOW: a link planted in the state directory is not followed."""
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    link = tmp_path / "audit.log"
    link.symlink_to(target)
    with pytest.raises(OSError) as caught:
        append_lines(link, ['{"event": "x"}'])
    assert caught.value.errno == errno.ELOOP
    assert target.read_bytes() == b"untouched"


# --- Considered: replayed disconnects, states tied to their account ------------------------------------------


def _disconnect_params(rig: Rig, account_id: int) -> dict[str, str]:
    client_id, secret = str(rig.settings.client_id), rig.settings.secret("client_secret") or ""
    sig = hmac.new(secret.encode(), f"{client_id}|{account_id}".encode(), hashlib.sha256).hexdigest()
    return {"account_id": str(account_id), "client_uuid": client_id, "signature": sig}


async def test_replayed_disconnect_keeps_an_account_whose_token_still_works(make_rig: RigFactory) -> None:
    """A captured, correctly signed hook URL: amoCRM still accepts the token, so 409, kept, audited; real one: 200."""
    rig = await make_rig(run_refresher=False)
    await rig.connect()
    params = _disconnect_params(rig, ACCOUNT_ID)
    for _ in range(2):
        resp = await rig.client.get(rig.url("/disconnect"), params=params)
        assert (resp.status, (await resp.json())["error"]) == (409, "token_still_valid")
    data, _ = rig.vault().read()
    assert str(ACCOUNT_ID) in data.accounts
    refused = [e for e in await _audit_events(rig) if e["event"] == "disconnect.refused"]
    assert [e["reason"] for e in refused] == ["token_still_valid"] * 2
    assert (await rig.client.get(rig.url("/test"))).status == 200
    rig.sandbox.revoke(ACCOUNT_ID)  # the user really removed the integration
    resp = await rig.client.get(rig.url("/disconnect"), params=params)
    assert (resp.status, (await resp.json())["had_tokens"]) == (200, True)
    data, _ = rig.vault().read()
    assert str(ACCOUNT_ID) not in data.accounts


class _RecordingClient:
    """Stands in for AmoClient in Flows: records the state sent with an exchange, and any token request."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self.token_calls: list[str] = []

    async def exchange_api_key(self, base_url: str, *, login: str, api_key: str, state: str) -> None:
        self.states.append(state)

    async def token_from_code(self, base_url: str, code: str, *, time_limit: float | None = None) -> dict[str, Any]:
        self.token_calls.append(base_url)
        return {"access_token": _jwt({"account_id": ACME_ID}), "refresh_token": "r", "expires_in": 3600}


async def test_state_issued_for_one_account_cannot_connect_another(tmp_path: Path, keys: KeyRing) -> None:
    """Multi-account: an exchange's state names its account host; a callback with another referer is refused."""
    settings = Settings(any_account=True, client_id="c", client_secret="s", redirect_uri="https://gw/cb",
                        vault_path=tmp_path / "v" / "vault.enc")
    vault = Vault(settings.vault_path, keys)
    vault.prepare()
    client = _RecordingClient()
    flows = Flows(settings, Store(vault), client, FakeClock())  # type: ignore[arg-type]
    await flows.exchange_api_key(LOGIN, API_KEY, None, "acme.amocrm.ru")
    state = client.states[0]
    with pytest.raises(RefererRefused, match="issued for"):
        await flows.callback("code", state, "other.amocrm.ru", from_exchange=True, from_widget=False)
    assert client.token_calls == []
    connected = await flows.callback("code", state, "acme.amocrm.ru", from_exchange=True, from_widget=False)
    assert (connected.account_id, client.token_calls) == (str(ACME_ID), ["https://acme.amocrm.ru"])
