"""Many accounts, Kommo hosts, account moves, long-lived tokens (accounts.py, manager.py, cli.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from amo_gateway.accounts import base_url_for_referer, select_account
from amo_gateway.errors import BadRequest, NotFound, RefererRefused
from amo_gateway.sandbox import LoopbackResolver, SandboxAccount
from amo_gateway.settings import Settings
from amo_gateway.tokens import Account, TokenPair, VaultData
from amo_gateway.typedefs import REFRESHER
from amo_gateway.vault import Vault
from tests.conftest import ACCOUNT_ID, API_KEY, LOGIN, FakeClock, Rig, RigFactory

ACME_ID = 555000
SANDBOX_ACCOUNTS = [SandboxAccount(ACCOUNT_ID, "demo", {LOGIN: API_KEY}), SandboxAccount(ACME_ID, "acme")]
MULTI = {"any_account": True, "account_url_template": "http://{{host}}:{sandbox_port}",
         "sandbox_accounts": SANDBOX_ACCOUNTS, "sandbox_api_domain": "api-b.amocrm.ru"}


async def _consent(rig: Rig, account_id: int, **extra: str) -> Any:
    """The browser flow: /authorize, the user clicks Allow on the sandbox, amoCRM redirects to the callback."""
    resp = await rig.client.get(rig.url("/authorize"), headers=rig.admin, allow_redirects=False)
    state = resp.headers["Location"].split("state=")[1].split("&")[0]
    async with rig.client.session.post(f"{rig.sandbox_url}/_sandbox/authorize",
                                       json={"state": state, "account_id": account_id}) as allow:
        redirect = (await allow.json())["redirect"]
    path = redirect.split("/", 3)[3]
    return await rig.client.get("/" + path + "".join(f"&{k}={v}" for k, v in extra.items()))


async def _multi_rig(make_rig: RigFactory, **extra: Any) -> Rig:
    return await make_rig(resolver=LoopbackResolver(), **{**MULTI, **extra})


async def test_two_accounts_connect_through_their_own_hosts_and_are_kept_apart(make_rig: RigFactory) -> None:
    """Each account is keyed by its id, has its own host and pair; ?account= picks by id or subdomain."""
    rig = await _multi_rig(make_rig)
    for account_id in (ACCOUNT_ID, ACME_ID):
        resp = await _consent(rig, account_id)
        assert resp.status == 200, await resp.text()
    data, _ = rig.vault().read()
    assert set(data.accounts) == {str(ACCOUNT_ID), str(ACME_ID)}
    assert data.accounts[str(ACME_ID)].base_url.startswith("http://acme.amocrm.ru:")
    by_id = await (await rig.client.get(rig.url(f"/token?account={ACME_ID}"), headers=rig.admin)).json()
    by_sub = await (await rig.client.get(rig.url("/token?account=acme"), headers=rig.admin)).json()
    assert by_id["access_token"] == by_sub["access_token"]
    assert by_id["account_id"] == str(ACME_ID)
    resp = await rig.client.get(rig.url("/token"), headers=rig.admin)
    assert (resp.status, (await resp.json())["error"]) == (400, "account_required")
    resp = await rig.client.get(rig.url("/test?account=demo"), headers=rig.admin)
    assert (await resp.json())["subdomain"] == "demo"


async def test_accounts_endpoint_lists_every_account_without_tokens(make_rig: RigFactory) -> None:
    """GET /accounts (operator) gives host, state, expiry, refresh-token age, last error; never a token."""
    rig = await _multi_rig(make_rig)
    await _consent(rig, ACCOUNT_ID)
    await _consent(rig, ACME_ID)
    resp = await rig.client.get(rig.url("/accounts"), headers=rig.admin)
    body = await resp.json()
    assert {a["account_id"] for a in body["accounts"]} == {str(ACCOUNT_ID), str(ACME_ID)}
    assert all(a["state"] == "connected" and a["access_expires_in"] > 0 for a in body["accounts"])
    data, _ = rig.vault().read()
    text = await resp.text()
    assert all(a.tokens and a.tokens.access_token not in text for a in data.accounts.values())
    assert (await rig.client.get(rig.url("/accounts"), headers={"Authorization": "Bearer consumer-secret-1"})
            ).status == 401


@pytest.mark.parametrize(
    ("referer", "allowed"),
    [
        ("acme.amocrm.ru", True),
        ("acme.amocrm.com", True),
        ("acme.kommo.com", True),
        ("https://acme.kommo.com/", True),
        ("evil.example.com", False),
        ("acme.amocrm.ru.evil.com", False),
        ("www.amocrm.ru", False),
        ("a.b.amocrm.ru", False),
        ("amocrm.ru", False),
        ("acme.amocrm.ru:8443", False),
    ],
)
def test_referer_allow_list_accepts_only_account_hosts(referer: str, allowed: bool) -> None:
    """Only {subdomain}.{amoCRM or Kommo base domain} may receive our client secret."""
    settings = Settings(any_account=True)
    if allowed:
        assert base_url_for_referer(referer, settings).startswith("https://acme.")
    else:
        with pytest.raises(RefererRefused):
            base_url_for_referer(referer, settings)


def test_configured_account_list_limits_which_accounts_may_connect() -> None:
    """With allowed_accounts, other subdomains are refused even on amoCRM's own domain."""
    settings = Settings(allowed_accounts=["acme"])
    assert base_url_for_referer("acme.amocrm.ru", settings) == "https://acme.amocrm.ru"
    with pytest.raises(RefererRefused):
        base_url_for_referer("other.amocrm.ru", settings)
    with pytest.raises(RefererRefused):
        base_url_for_referer("acme.amocrm.ru", Settings(domain="reforyou.amocrm.ru"))


def test_account_selection_by_id_subdomain_or_the_only_one() -> None:
    """select_account: an explicit id or subdomain, the single account by default, otherwise an error."""
    one = VaultData(accounts={"7": Account("7", "https://acme.amocrm.ru", subdomain="acme")})
    assert select_account(one, None) == "7"
    assert select_account(one, "ACME") == "7"
    with pytest.raises(NotFound):
        select_account(one, "8")
    two = VaultData(accounts={**one.accounts, "8": Account("8", "https://b.kommo.com", subdomain="b")})
    with pytest.raises(BadRequest):
        select_account(two, None)


async def test_widget_install_without_state_needs_the_mode_enabled(make_rig: RigFactory) -> None:
    """from_widget=1 with no state: refused by default, accepted (with an allowed referer) when enabled."""
    for enabled, expected in ((False, 400), (True, 200)):
        rig = await _multi_rig(make_rig, widget_installs=enabled)
        code = rig.sandbox.issue_code(ACME_ID)
        resp = await rig.client.get(rig.url("/callback"),
                                    params={"code": code, "referer": "acme.amocrm.ru", "from_widget": "1"})
        assert resp.status == expected, await resp.text()


async def test_account_move_is_followed_persisted_and_refresh_goes_on(make_rig: RigFactory) -> None:
    """After a rename the old host 404s; the gateway asks api_domain for the new one, stores it, refreshes."""
    clock = FakeClock()
    rig = await _multi_rig(make_rig, clock=clock, run_refresher=False, sandbox_access_ttl=3600, refresh_margin=600)
    await _consent(rig, ACME_ID)
    SANDBOX_ACCOUNTS[1].subdomain = "acme-renamed"
    try:
        clock.advance(3100)
        outcomes = await rig.app[REFRESHER].tick()
    finally:
        SANDBOX_ACCOUNTS[1].subdomain = "acme"
    assert [o.result for o in outcomes] == ["refreshed"]
    data, _ = rig.vault().read()
    moved = data.accounts[str(ACME_ID)]
    assert moved.base_url.startswith("http://acme-renamed.amocrm.ru:")
    assert moved.subdomain == "acme-renamed"
    assert moved.tokens is not None and moved.tokens.refresh_token == rig.sandbox.live_refresh_token(ACME_ID)


async def _storm_rig(make_rig: RigFactory, clock: FakeClock, n: int) -> Rig:
    """The gateway with n accounts connected through the sandbox, none due yet."""
    accounts = [SandboxAccount(ACCOUNT_ID, "demo", {LOGIN: API_KEY})]
    accounts += [SandboxAccount(1000 + i, f"acct{i}") for i in range(n)]
    rig = await make_rig(clock=clock, run_refresher=False, resolver=LoopbackResolver(), sandbox_accounts=accounts,
                         account_url_template="http://{{host}}:{sandbox_port}", any_account=True,
                         sandbox_access_ttl=3600, refresh_margin=600)
    for i in range(n):
        await _consent(rig, 1000 + i)
    return rig


def _count_saves(rig: Rig) -> list[int]:
    """Watch the vault's saves: one entry per save, how many accounts it leaves marked in flight."""
    vault = rig.app[REFRESHER].manager.store.vault
    marked: list[int] = []
    original = vault.save

    def counting_save(data: VaultData) -> None:
        marked.append(sum(a.in_flight is not None for a in data.accounts.values()))
        original(data)

    vault.save = counting_save  # type: ignore[method-assign]
    return marked


async def test_refresh_storm_over_many_accounts_writes_the_vault_a_few_times(make_rig: RigFactory) -> None:
    """Forty due accounts are claimed in one write and stored in one write, not 80 rewrites."""
    clock = FakeClock()
    rig = await _storm_rig(make_rig, clock, 40)
    saves = _count_saves(rig)
    clock.advance(3100)
    outcomes = await rig.app[REFRESHER].tick()
    assert [o.result for o in outcomes].count("refreshed") == 40
    assert len(saves) == 2
    assert rig.sandbox.refresh_tokens_reused == 0
    # The gateway keeps no idle socket per account host (41 without force_close): the one left is the test's
    # own keep-alive connection, which clicked Allow on the sandbox for each consent.
    assert _established_to(URL(rig.sandbox_url).port or 0) <= 1


def _established_to(port: int) -> int:
    """Open (ESTABLISHED) TCP connections whose far end is 127.0.0.1:`port`, from /proc/net/tcp."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[2] == f"0100007F:{port:04X}" and line.split()[3] == "01")


async def test_refresh_storm_in_batches_keeps_at_most_two_batches_in_flight(make_rig: RigFactory) -> None:
    """With a batch size (as on PostgreSQL), 40 due accounts go as 3 batches of one claim and one store each,
    and no write ever leaves more than two batches marked in flight: a crash mid-storm loses at most those."""
    clock = FakeClock()
    rig = await _storm_rig(make_rig, clock, 40)
    rig.app[REFRESHER].manager.batch_size = 15
    saves = _count_saves(rig)
    clock.advance(3100)
    outcomes = await rig.app[REFRESHER].tick()
    assert [o.result for o in outcomes].count("refreshed") == 40
    assert len(saves) == 6 and max(saves) <= 30 and saves[-1] == 0
    assert rig.sandbox.refresh_tokens_reused == 0


def _jwt(claims: dict[str, Any]) -> str:
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJSUzI1NiJ9.{part}.c2lnbmF0dXJl"


async def test_long_lived_token_is_served_never_refreshed_and_its_expiry_watched(
    make_rig: RigFactory, tmp_path: Path
) -> None:
    """import-token stores it; /token serves it; the refresher never spends it but warns before expiry."""
    clock = FakeClock()
    rig = await make_rig(clock=clock, run_refresher=False)
    token = _jwt({"account_id": 4242, "exp": int(clock.time()) + 86400 * 3})
    token_file = tmp_path / "token"
    token_file.write_text(token)
    key_file = tmp_path / "key"
    key_file.write_text("\n".join(rig.keys.keys))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMO_")}
    env |= {"AMO_VAULT_PATH": str(rig.settings.vault_path), "AMO_VAULT_KEY_FILE": str(key_file)}
    command = [sys.executable, "-m", "amo_gateway", "import-token", str(token_file), "--host", "acme.amocrm.ru"]
    result = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout
    resp = await rig.client.get(rig.url("/token?account=4242"), headers=rig.admin)
    assert (await resp.json())["access_token"] == token
    clock.advance(86400 * 2.5)
    assert await rig.app[REFRESHER].tick() == []
    data, _ = rig.vault().read()
    assert rig.app[REFRESHER].watch_long_lived(data) == ["4242"]
    assert rig.app[REFRESHER].watch_long_lived(data) == [], "warned at most hourly"
    clock.advance(86400)
    resp = await rig.client.get(rig.url("/token?account=4242"), headers=rig.admin)
    assert (resp.status, (await resp.json())["error"]) == (503, "reauth_required")
    assert rig.sandbox.refresh_attempts == 0


def test_status_table_shows_host_state_expiry_age_and_error(tmp_path: Path, keys: Any) -> None:
    """`amo-gateway status` prints one row per account with the columns operators need."""
    vault = Vault(tmp_path / "v" / "vault.enc", keys)
    vault.prepare()
    now = time.time()
    good = Account("7", "https://acme.amocrm.ru", TokenPair("a", "r", now + 3600, now), refresh_obtained_at=now)
    dead = TokenPair("a2", "r2", now - 5, now - 90000)
    bad = Account("8", "https://b.kommo.com", dead).needing_reauth("token_revoked")
    vault.save(VaultData(accounts={"7": good, "8": bad}))
    key_file = tmp_path / "key"
    key_file.write_text("\n".join(keys.keys))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMO_")}
    env |= {"AMO_VAULT_PATH": str(vault.path), "AMO_VAULT_KEY_FILE": str(key_file)}
    out = subprocess.run([sys.executable, "-m", "amo_gateway", "status"], capture_output=True, text=True, env=env,
                         check=True).stdout
    lines = out.splitlines()
    assert "refresh age" in lines[0] and "last error" in lines[0]
    assert any("acme.amocrm.ru" in ln and "connected" in ln and "0.0d" in ln for ln in lines)
    assert any("b.kommo.com" in ln and "reauth_required" in ln and "token_revoked" in ln for ln in lines)


async def test_exchange_can_target_a_new_allowed_account_host(make_rig: RigFactory) -> None:
    """?account=demo.amocrm.ru sends the exchange to that host; the callback redeems the code there too."""
    rig = await _multi_rig(make_rig)
    resp = await rig.client.post(rig.url("/exchange-api-key?account=demo.amocrm.ru"),
                                 json={"login": LOGIN, "api_key": API_KEY}, headers=rig.admin)
    assert resp.status == 202, await resp.text()
    assert (await rig.callback_answer())["status"] == 200
    data, _ = rig.vault().read()
    assert data.accounts[str(ACCOUNT_ID)].base_url.startswith("http://demo.amocrm.ru:")
    resp = await rig.client.post(rig.url("/exchange-api-key?account=demo.evil.com"),
                                 json={"login": "x@y.z", "api_key": API_KEY}, headers=rig.admin)
    assert (resp.status, (await resp.json())["error"]) == (400, "account_not_allowed")
