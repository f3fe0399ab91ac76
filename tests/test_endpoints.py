"""The seed's endpoints end to end against the sandbox, over real loopback HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json

from amo_gateway.tokens import CONNECTED
from amo_gateway.typedefs import MANAGER
from tests.conftest import ACCOUNT_ID, API_KEY, LOGIN, Rig, RigFactory

SEED_EXCHANGE = {
    "message": "API key exchange request accepted",
    "status": "accepted",
    "note": "Authorization code will be sent to redirect URI",
}


async def test_exchange_answers_the_seeds_exact_json_and_callback_connects(rig: Rig) -> None:
    """POST exchange → 202 seed JSON; amoCRM's callback → 200 seed JSON with fromExchange true; pair stored."""
    resp = await rig.client.post(rig.url("/exchange-api-key"), json={"login": LOGIN, "api_key": API_KEY},
                                 headers=rig.admin)
    assert resp.status == 202
    assert await resp.json() == SEED_EXCHANGE
    record = await rig.callback_answer()
    assert record["status"] == 200
    body = json.loads(record["body"])
    assert body["message"] == "AMO CRM successfully connected"
    assert body["status"] == "success"
    assert body["fromExchange"] is True
    data, _ = rig.vault().read()
    account = data.accounts[str(ACCOUNT_ID)]
    assert account.status == CONNECTED
    assert account.tokens is not None
    assert account.tokens.refresh_token == rig.sandbox.live_refresh_token(ACCOUNT_ID)


async def test_exchange_without_operator_bearer_is_refused(rig: Rig) -> None:
    """No bearer, no exchange: 401 JSON and amoCRM is never called."""
    resp = await rig.client.post(rig.url("/exchange-api-key"), json={"login": LOGIN, "api_key": API_KEY})
    assert resp.status == 401
    assert (await resp.json())["error"] == "unauthorized"
    assert rig.sandbox.exchange_calls == 0


async def test_second_exchange_within_five_minutes_is_429_and_never_reaches_amocrm(rig: Rig) -> None:
    """The per-login 5-minute slot is enforced locally with Retry-After."""
    await rig.connect()
    resp = await rig.client.post(rig.url("/exchange-api-key"), json={"login": LOGIN.upper(), "api_key": API_KEY},
                                 headers=rig.admin)
    assert resp.status == 429
    assert 0 < int(resp.headers["Retry-After"]) <= 300
    assert (await resp.json())["error"] == "exchange_rate_limited"
    assert rig.sandbox.exchange_calls == 1


async def test_exchange_slot_survives_a_restart(make_rig: RigFactory) -> None:
    """The slot is in the vault: a new gateway process on the same vault still refuses within 5 minutes."""
    first = await make_rig()
    await first.connect()
    second = await make_rig(vault_path=first.settings.vault_path)
    resp = await second.client.post(second.url("/exchange-api-key"), json={"login": LOGIN, "api_key": API_KEY},
                                    headers=second.admin)
    assert resp.status == 429


async def test_amocrm_refusals_of_the_exchange_become_clear_json(rig: Rig) -> None:
    """403 → forbidden_by_amocrm, 400 (wrong key) → upstream_rejected, 5xx → upstream_unavailable."""
    resp = await rig.client.post(rig.url("/exchange-api-key"),
                                 json={"login": "viewer@example.com", "api_key": "x"}, headers=rig.admin)
    assert (resp.status, (await resp.json())["error"]) == (403, "forbidden_by_amocrm")
    resp = await rig.client.post(rig.url("/exchange-api-key"), json={"login": LOGIN, "api_key": "wrong"},
                                 headers=rig.admin)
    assert (resp.status, (await resp.json())["error"]) == (400, "upstream_rejected")
    rig.sandbox.fail_next["exchange"] = [503]
    resp = await rig.client.post(rig.url("/exchange-api-key"), json={"login": LOGIN, "api_key": API_KEY},
                                 headers=rig.admin)
    assert (resp.status, (await resp.json())["error"]) == (502, "upstream_unavailable")
    resp = await rig.client.post(rig.url("/exchange-api-key"), json={"login": LOGIN, "api_key": API_KEY},
                                 headers=rig.admin)
    assert resp.status == 202, "a failed attempt must not use up the 5-minute slot"


async def test_amocrm_429_on_exchange_becomes_429_with_retry_after(rig: Rig) -> None:
    """amoCRM's own 'called too frequently' is passed on as 429 and holds the local slot."""
    rig.sandbox.fail_next["exchange"] = [429]
    resp = await rig.client.post(rig.url("/exchange-api-key"), json={"login": LOGIN, "api_key": API_KEY},
                                 headers=rig.admin)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "300"
    resp = await rig.client.post(rig.url("/exchange-api-key"), json={"login": LOGIN, "api_key": API_KEY},
                                 headers=rig.admin)
    assert resp.status == 429
    assert rig.sandbox.hits["exchange"] == 1


async def test_operator_state_is_a_label_kept_beside_the_gateways_own_state(rig: Rig) -> None:
    """The operator's state is not what amoCRM sees; it comes back in the callback answer."""
    resp = await rig.client.post(rig.url("/exchange-api-key"),
                                 json={"login": LOGIN, "api_key": API_KEY, "state": "ticket-42"}, headers=rig.admin)
    assert resp.status == 202
    record = await rig.callback_answer()
    assert record["state"] != "ticket-42"
    assert len(record["state"]) >= 32
    assert json.loads(record["body"])["state"] == "ticket-42"


async def test_callback_with_unknown_state_is_refused_before_any_token_call(rig: Rig) -> None:
    """A forged callback gets 400 invalid_state and no code is redeemed."""
    code = rig.sandbox.issue_code(ACCOUNT_ID)
    resp = await rig.client.get(rig.url("/callback"), params={"code": code, "state": "forged", "from_exchange": "1"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_state"
    assert rig.sandbox.codes_redeemed == 0


async def test_callback_without_state_is_refused(rig: Rig) -> None:
    """No state and widget installs disabled: 400 missing_state."""
    resp = await rig.client.get(rig.url("/callback"), params={"code": "abc"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "missing_state"


async def test_state_is_single_use(rig: Rig) -> None:
    """Replaying the callback's state fails even with a fresh code."""
    record = await rig.connect()
    code = rig.sandbox.issue_code(ACCOUNT_ID)
    resp = await rig.client.get(rig.url("/callback"), params={"code": code, "state": record["state"]})
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_state"


async def test_foreign_referer_is_refused_and_does_not_use_up_the_state(rig: Rig) -> None:
    """A referer that is not the account host never gets our secret; the state stays valid."""
    resp = await rig.client.get(rig.url("/authorize"), headers=rig.admin, allow_redirects=False)
    state = resp.headers["Location"].split("state=")[1].split("&")[0]
    code = rig.sandbox.issue_code(ACCOUNT_ID)
    resp = await rig.client.get(rig.url("/callback"),
                                params={"code": code, "state": state, "referer": "evil.example.com"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "referer_refused"
    assert rig.sandbox.codes_redeemed == 0
    host = rig.sandbox_url.split("//")[1]
    resp = await rig.client.get(rig.url("/callback"), params={"code": code, "state": state, "referer": host})
    assert resp.status == 200
    body = await resp.json()
    assert body["fromExchange"] is False


async def test_state_survives_a_gateway_restart(make_rig: RigFactory) -> None:
    """A state issued by one gateway process is accepted by the next one on the same vault."""
    first = await make_rig()
    resp = await first.client.get(first.url("/authorize"), headers=first.admin, allow_redirects=False)
    state = resp.headers["Location"].split("state=")[1].split("&")[0]
    await first.client.close()
    second = await make_rig(vault_path=first.settings.vault_path)
    code = second.sandbox.issue_code(ACCOUNT_ID)
    resp = await second.client.get(second.url("/callback"), params={"code": code, "state": state})
    assert resp.status == 200, await resp.text()


async def test_authorize_redirects_to_the_consent_page_with_a_fresh_state(rig: Rig) -> None:
    """302 to {auth_url}?client_id=…&state=…&mode=post_message; a new state each time."""
    first = await rig.client.get(rig.url("/authorize"), headers=rig.admin, allow_redirects=False)
    second = await rig.client.get(rig.url("/authorize"), headers=rig.admin, allow_redirects=False)
    assert first.status == 302
    location = first.headers["Location"]
    assert location.startswith(rig.settings.auth_url + "?client_id=")
    assert "mode=post_message" in location
    assert location != second.headers["Location"]
    anonymous = await rig.client.get(rig.url("/authorize"), allow_redirects=False)
    assert anonymous.status == 401


async def test_test_endpoint_reports_the_account_without_any_token(rig: Rig) -> None:
    """/test with a bearer: 200 with account id, subdomain and expiry; the body carries no token."""
    await rig.connect()
    resp = await rig.client.get(rig.url("/test"), headers=rig.admin)
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "connected"
    assert body["account_id"] == str(ACCOUNT_ID)
    assert body["subdomain"] == "demo"
    assert body["expires_in"] > 0
    data, _ = rig.vault().read()
    tokens = data.accounts[str(ACCOUNT_ID)].tokens
    assert tokens is not None
    text = await resp.text()
    assert tokens.access_token not in text
    assert str(tokens.refresh_token) not in text


async def test_test_tells_the_public_only_status_and_expiry(rig: Rig) -> None:
    """Without a bearer /test says `status`, `expires_at` and `expires_in`: no account id, subdomain or name."""
    await rig.connect()
    full = await (await rig.client.get(rig.url("/test"), headers=rig.admin)).json()
    resp = await rig.client.get(rig.url("/test"))
    assert resp.status == 200
    body = await resp.json()
    assert body == {"status": "connected", "expires_at": full["expires_at"], "expires_in": body["expires_in"]}
    assert 0 < body["expires_in"] <= full["expires_in"]
    assert "demo" not in (await resp.text()).lower()  # the sandbox account's subdomain and name


async def test_test_shows_the_account_to_a_consumer_and_refuses_a_wrong_bearer(rig: Rig) -> None:
    """A consumer's bearer sees the account's id and subdomain; a wrong bearer is 401, not the public view."""
    await rig.connect()
    resp = await rig.client.get(rig.url("/test"), headers={"Authorization": "Bearer consumer-secret-1"})
    body = await resp.json()
    assert (resp.status, body["account_id"], body["subdomain"]) == (200, str(ACCOUNT_ID), "demo")
    for bad in ("Bearer nope", "Basic consumer-secret-1"):
        resp = await rig.client.get(rig.url("/test"), headers={"Authorization": bad})
        assert (resp.status, (await resp.json())["error"]) == (401, "unauthorized")


async def test_test_and_token_say_not_connected_before_any_exchange(rig: Rig) -> None:
    """503 not_connected from both /test and /token."""
    resp = await rig.client.get(rig.url("/test"))
    assert (resp.status, (await resp.json())["error"]) == (503, "not_connected")
    resp = await rig.client.get(rig.url("/token"), headers=rig.admin)
    assert (resp.status, (await resp.json())["error"]) == (503, "not_connected")


async def test_test_answer_is_cached_briefly_to_spare_the_rate_budget(make_rig: RigFactory) -> None:
    """Ten polls of /test inside the cache window make one call to amoCRM."""
    rig = await make_rig(test_cache_seconds=30)
    await rig.connect()
    before = rig.sandbox.api_requests
    for _ in range(10):
        assert (await rig.client.get(rig.url("/test"))).status == 200
    assert rig.sandbox.api_requests - before == 1


async def test_token_gives_the_access_token_never_the_refresh_token(rig: Rig) -> None:
    """Operator and consumers get the access token; wrong bearer is 401; the refresh token never appears."""
    await rig.connect()
    data, _ = rig.vault().read()
    tokens = data.accounts[str(ACCOUNT_ID)].tokens
    assert tokens is not None
    for bearer in (rig.admin["Authorization"], "Bearer consumer-secret-1"):
        resp = await rig.client.get(rig.url("/token"), headers={"Authorization": bearer})
        assert resp.status == 200
        body = await resp.json()
        assert body["access_token"] == tokens.access_token
        assert str(tokens.refresh_token) not in await resp.text()
    for bad in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic consumer-secret-1"}):
        assert (await rig.client.get(rig.url("/token"), headers=bad)).status == 401


async def test_consumer_token_does_not_open_operator_endpoints(rig: Rig) -> None:
    """A consumer token opens /token, never /exchange-api-key or /authorize."""
    consumer = {"Authorization": "Bearer consumer-secret-1"}
    resp = await rig.client.post(rig.url("/exchange-api-key"), json={"login": LOGIN, "api_key": API_KEY},
                                 headers=consumer)
    assert resp.status == 401
    assert (await rig.client.get(rig.url("/authorize"), headers=consumer, allow_redirects=False)).status == 401


def _signature(secret: str, client_uuid: str, account_id: str) -> str:
    return hmac.new(secret.encode(), f"{client_uuid}|{account_id}".encode(), hashlib.sha256).hexdigest()


async def test_disconnect_with_valid_signature_forgets_the_account(rig: Rig) -> None:
    """A correctly signed disconnect removes the tokens; /test then says not connected."""
    await rig.connect()
    rig.sandbox.revoke(ACCOUNT_ID)  # amoCRM kills the tokens before it calls the hook (test_refusals: replays)
    sig = _signature(rig.settings.secret("client_secret") or "", str(rig.settings.client_id), str(ACCOUNT_ID))
    resp = await rig.client.get(rig.url("/disconnect"), params={
        "account_id": str(ACCOUNT_ID), "client_uuid": str(rig.settings.client_id), "signature": sig})
    assert resp.status == 200
    data, _ = rig.vault().read()
    assert str(ACCOUNT_ID) not in data.accounts
    assert (await rig.client.get(rig.url("/test"))).status == 503


async def test_disconnect_with_bad_signature_changes_nothing(rig: Rig) -> None:
    """A forged signature is 403 and the vault keeps the pair."""
    await rig.connect()
    before = rig.settings.vault_path.read_bytes()
    wrong = _signature("not-the-secret", str(rig.settings.client_id), str(ACCOUNT_ID))
    for params in (
        {"account_id": str(ACCOUNT_ID), "client_uuid": str(rig.settings.client_id), "signature": wrong},
        {"account_id": str(ACCOUNT_ID), "client_uuid": "other-client", "signature": wrong},
    ):
        resp = await rig.client.get(rig.url("/disconnect"), params=params)
        assert resp.status == 403
        assert (await resp.json())["error"] == "invalid_signature"
    assert rig.settings.vault_path.read_bytes() == before
    missing = await rig.client.get(rig.url("/disconnect"), params={"account_id": str(ACCOUNT_ID)})
    assert missing.status == 400


async def test_browser_consent_flow_connects_through_the_sandbox_consent_page(make_rig: RigFactory) -> None:
    """/authorize → consent page (sandbox, auto-approved) → callback with code, state and referer → connected."""
    import aiohttp

    rig = await make_rig(auth_url="http://127.0.0.1:{sandbox_port}/oauth")
    async with aiohttp.ClientSession() as browser:
        async with browser.get(rig.client.make_url(rig.url("/authorize")), headers=rig.admin) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
            hops = [str(h.url) for h in resp.history]
    assert body["fromExchange"] is False
    assert any("/oauth?client_id=" in h for h in hops)
    assert str(resp.url).split("?")[0].endswith("/callback")
    data, _ = rig.vault().read()
    assert str(ACCOUNT_ID) in data.accounts


async def test_concurrent_test_polls_share_one_call_to_amocrm(make_rig: RigFactory) -> None:
    """Fifty simultaneous /test requests with an empty cache make one /api/v4/account call, not fifty."""
    import asyncio

    rig = await make_rig(test_cache_seconds=0)
    await rig.connect()
    rig.sandbox.delay["account"] = 0.2
    before = rig.sandbox.api_requests
    answers = await asyncio.gather(*(rig.client.get(rig.url("/test")) for _ in range(50)))
    assert {a.status for a in answers} == {200}
    assert rig.sandbox.api_requests - before == 1


async def test_expired_test_answer_is_served_while_one_probe_renews_it(make_rig: RigFactory) -> None:
    """Past its cache time, /test answers at once from the last answer and renews it in the background."""
    import asyncio
    import time

    rig = await make_rig(test_cache_seconds=0.2)
    await rig.connect()
    assert (await rig.client.get(rig.url("/test"))).status == 200
    await asyncio.sleep(0.3)
    rig.sandbox.delay["account"] = 1.0
    before = rig.sandbox.api_requests
    started = time.monotonic()
    resp = await rig.client.get(rig.url("/test"))
    assert resp.status == 200 and time.monotonic() - started < 0.5
    await asyncio.sleep(1.2)
    assert rig.sandbox.api_requests - before == 1
    rig.sandbox.revoke(ACCOUNT_ID, access=False)
    await rig.app[MANAGER].store.update(
        lambda data: data.accounts.__setitem__(str(ACCOUNT_ID), data.accounts[str(ACCOUNT_ID)].needing_reauth("x")))
    resp = await rig.client.get(rig.url("/test"))
    assert (resp.status, (await resp.json())["error"]) == (503, "reauth_required"), "state is never served stale"
