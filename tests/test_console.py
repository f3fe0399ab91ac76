"""The operator console over HTTP: session cookie, CSRF, security headers, language, the consent popup's answer,
and that no page ever holds a token, code, API key or secret."""

from __future__ import annotations

import asyncio
import re
from http.cookies import SimpleCookie
from typing import Any

import pytest
from aiohttp import ClientResponse

from amo_gateway.audit import audit_path
from amo_gateway.console import session
from amo_gateway.console.i18n import choose_language
from amo_gateway.console.pages import state_of
from amo_gateway.typedefs import ALERT_HISTORY, AUDIT, MANAGER, STORE
from tests.conftest import ACCOUNT_ID as ACCOUNT
from tests.conftest import API_KEY, LOGIN, FakeClock, Rig, RigFactory

CONSOLE = "/api/v1/integrations/amo-crm/console"
SANDBOX_CONSENT = "http://127.0.0.1:{sandbox_port}/oauth"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _cookies(resp: ClientResponse) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    for header in resp.headers.getall("Set-Cookie", []):
        jar.load(header)
    return jar


async def _login_page(rig: Rig, **headers: str) -> tuple[str, str]:
    """GET the console signed out: (its HTML, the login form's CSRF token)."""
    resp = await rig.client.get(CONSOLE, headers=headers)
    assert resp.status == 200
    text = await resp.text()
    return text, CSRF.search(text).group(1)  # type: ignore[union-attr]


async def sign_in(rig: Rig, **headers: str) -> tuple[ClientResponse, str]:
    """Sign in through the form; (the login answer, the dashboard's CSRF token)."""
    _, csrf = await _login_page(rig)
    token = rig.settings.secret("admin_token")
    resp = await rig.client.post(f"{CONSOLE}/login", data={"csrf": csrf, "token": token}, allow_redirects=False,
                                 headers=headers)
    assert resp.status == 303, await resp.text()
    page = await (await rig.client.get(CONSOLE)).text()
    return resp, CSRF.search(page).group(1)  # type: ignore[union-attr]


async def post(rig: Rig, action: str, data: dict[str, str], **headers: str) -> ClientResponse:
    return await rig.client.post(f"{CONSOLE}/{action}", data=data, allow_redirects=False, headers=headers)


# --- the cookie ---------------------------------------------------------------------------------------------


def test_cookie_verifies_until_it_expires_and_not_after_tampering() -> None:
    """A cookie is honoured until its expiry; a changed expiry, id or signature, or another key, is refused."""
    key = session.session_key("k" * 44, "admin")
    value = session.issue(key, 1000.0, 3600)
    assert session.verify(key, value, 1000.0 + 3599) is not None
    assert session.verify(key, value, 1000.0 + 3600) is None
    version, expires, sid, sig = value.split(".")
    assert session.verify(key, f"{version}.{int(expires) + 9999}.{sid}.{sig}", 1000.0) is None
    assert session.verify(key, f"{version}.{expires}.x{sid}.{sig}", 1000.0) is None
    assert session.verify(key, value[:-2], 1000.0) is None
    assert session.verify(session.session_key("k" * 44, "another admin token"), value, 1000.0) is None
    assert session.verify(key, None, 1000.0) is None


async def test_sign_in_sets_a_strict_http_only_expiring_cookie(rig: Rig) -> None:
    """The operator token in the form gives a session cookie: HttpOnly, SameSite=Strict, 8 h, console path only;
    not Secure over plain HTTP."""
    resp, _ = await sign_in(rig)
    cookie = _cookies(resp)["amo_console"]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["max-age"] == str(8 * 3600)
    assert cookie["path"] == CONSOLE
    assert not cookie["secure"]
    page = await (await rig.client.get(CONSOLE)).text()
    assert 'action="/api/v1/integrations/amo-crm/console/logout"' in page


async def test_cookie_is_secure_behind_tls(rig: Rig) -> None:
    """Behind a trusted proxy that says the browser came over HTTPS, the cookies are marked Secure."""
    resp = await rig.client.get(CONSOLE, headers={"X-Forwarded-Proto": "https"})
    assert _cookies(resp)["amo_console_login"]["secure"] is True
    _, csrf = await _login_page(rig)
    token = rig.settings.secret("admin_token")
    resp = await post(rig, "login", {"csrf": csrf, "token": token}, **{"X-Forwarded-Proto": "https"})
    assert _cookies(resp)["amo_console"]["secure"] is True


async def test_wrong_operator_token_gives_no_session(rig: Rig) -> None:
    """A wrong token comes back to the sign-in form with a line saying so, and no session cookie."""
    _, csrf = await _login_page(rig)
    resp = await post(rig, "login", {"csrf": csrf, "token": "not-the-token"})
    assert resp.status == 303 and resp.headers["Location"].endswith("?error=bad_token")
    assert "amo_console" not in _cookies(resp)
    page = await (await rig.client.get(resp.headers["Location"])).text()
    assert "That is not the operator token." in page and 'name="token"' in page


async def test_session_ends_after_the_configured_hours(make_rig: RigFactory) -> None:
    """AMO_CONSOLE_SESSION_HOURS: past it the console shows the sign-in form again and refuses actions."""
    clock = FakeClock()
    rig = await make_rig(clock=clock, run_refresher=False, console_session_hours=2)
    _, csrf = await sign_in(rig)
    clock.advance(2 * 3600 + 1)
    page = await (await rig.client.get(CONSOLE)).text()
    assert 'name="token"' in page
    resp = await post(rig, "connect", {"csrf": csrf})
    assert resp.status == 303 and resp.headers["Location"].endswith("?notice=session_expired")


async def test_a_session_made_by_one_process_is_honoured_by_another_on_the_same_vault(
        make_rig: RigFactory) -> None:
    """The cookie key comes from the vault key and the operator token, so a second gateway process on the same
    vault (same key file, same AMO_ADMIN_TOKEN) honours a session the first one made; another token does not."""
    first = await make_rig(admin_token="operator-token-1")
    resp, _ = await sign_in(first)
    cookie = {"Cookie": f"amo_console={_cookies(resp)['amo_console'].value}"}
    second = await make_rig(admin_token="operator-token-1")  # same tmp_path: the same vault and key ring
    assert second.settings.vault_path == first.settings.vault_path
    page = await (await second.client.session.get(second.client.make_url(CONSOLE), headers=cookie)).text()
    assert 'action="/api/v1/integrations/amo-crm/console/logout"' in page
    other = await make_rig(admin_token="operator-token-2")
    page = await (await other.client.session.get(other.client.make_url(CONSOLE), headers=cookie)).text()
    assert 'name="token"' in page


# --- CSRF -------------------------------------------------------------------------------------------------


async def test_state_changing_posts_without_the_csrf_token_are_refused(rig: Rig) -> None:
    """With a valid session, a POST without the CSRF token, or with another's, is a 403 and changes nothing."""
    account = str((await rig.connect())["account_id"])
    _, csrf = await sign_in(rig)
    for action in ("connect", "exchange", "forget", "logout"):
        for data in ({}, {"csrf": "forged"}, {"csrf": session.csrf_token(b"x" * 32, "sid")}):
            resp = await post(rig, action, {**data, "account": account, "confirmed": "1"})
            assert resp.status == 403, (action, data)
            assert (await resp.json())["error"] == "csrf_failed"
    assert (await rig.app[STORE].snapshot()).accounts  # the forget never happened
    assert (await post(rig, "forget", {"csrf": csrf, "account": account})).status == 200  # the token works


async def test_cross_site_posts_are_refused_even_with_a_token(rig: Rig) -> None:
    """A request the browser marks as cross-site (Sec-Fetch-Site) is refused before anything else."""
    _, csrf = await sign_in(rig)
    resp = await post(rig, "connect", {"csrf": csrf}, **{"Sec-Fetch-Site": "cross-site"})
    assert resp.status == 403


async def test_login_form_needs_its_csrf_token(rig: Rig) -> None:
    """Even signing in needs the form's token (bound to a pre-login cookie), against login CSRF."""
    await _login_page(rig)
    token = rig.settings.secret("admin_token")
    resp = await post(rig, "login", {"token": token})
    assert resp.status == 403 and (await resp.json())["error"] == "csrf_failed"


# --- headers and language ---------------------------------------------------------------------------------


async def test_pages_carry_a_strict_csp_and_cannot_be_framed(rig: Rig) -> None:
    """CSP without inline script or style, frame-ancestors 'none', X-Frame-Options DENY; the HTML has no inline
    script, handler or style attribute to need them."""
    for page in (await rig.client.get(CONSOLE), await rig.client.get(CONSOLE)):
        csp = page.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        assert "default-src 'none'" in csp
        assert page.headers["X-Frame-Options"] == "DENY"
        assert page.headers["Cache-Control"] == "no-store"
    await rig.connect()
    await sign_in(rig)
    html = await (await rig.client.get(CONSOLE)).text()
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    assert not re.search(r"\son[a-z]+=|\sstyle=|<style", html)
    script = await rig.client.get(f"{CONSOLE}/static/console.js")
    assert script.status == 200 and script.content_type == "text/javascript"


def test_language_is_chosen_by_accept_language() -> None:
    """Ukrainian when it is preferred, English otherwise (and for languages the console does not speak)."""
    assert choose_language("uk-UA,uk;q=0.9,en;q=0.8") == "uk"
    assert choose_language("en-US,en;q=0.9,uk;q=0.8") == "en"
    assert choose_language("de-DE,uk;q=0.5") == "uk"
    assert choose_language("de, fr") == "en"
    assert choose_language(None) == "en"
    assert choose_language("uk;q=0, en;q=0.1") == "en"


async def test_pages_speak_ukrainian_when_asked(rig: Rig) -> None:
    """The same console in Ukrainian for a Ukrainian browser; lang attribute set accordingly."""
    text, _ = await _login_page(rig, **{"Accept-Language": "uk-UA,uk;q=0.9"})
    assert '<html lang="uk">' in text and "Токен оператора" in text
    text, _ = await _login_page(rig, **{"Accept-Language": "en-GB"})
    assert '<html lang="en">' in text and "Operator token" in text


# --- what the console shows and does ---------------------------------------------------------------------


async def test_console_never_renders_a_secret(rig: Rig) -> None:
    """After an exchange from the form and a refresh, no page or redirect holds a token, the API key, the client
    secret or the operator token, though the audit trail and the account are shown."""
    _, csrf = await sign_in(rig)
    resp = await post(rig, "exchange", {"csrf": csrf, "login": LOGIN, "api_key": API_KEY})
    assert resp.headers["Location"].endswith("?notice=exchange_requested")
    await rig.callback_answer()
    html = await (await rig.client.get(resp.headers["Location"])).text()
    assert 'data-tone="green"' in html and "exchange.requested" in html
    account = next(iter((await rig.app[STORE].snapshot()).accounts.values()))
    assert account.tokens is not None
    secrets_ = [account.tokens.access_token, account.tokens.refresh_token or "", API_KEY,
                rig.settings.secret("client_secret") or "", rig.settings.secret("admin_token") or ""]
    callback_code = rig.sandbox.callbacks[-1]["code"]
    forget = await (await post(rig, "forget", {"csrf": csrf, "account": account.account_id})).text()
    for page in (html, forget, resp.headers["Location"]):
        for secret in [*secrets_, callback_code]:
            assert secret not in page


async def test_reauth_required_account_is_red_with_its_reason(rig: Rig) -> None:
    """An account whose refresh token amoCRM revoked shows red, in words, with a Reconnect button."""
    await rig.connect()
    rig.sandbox.revoke(rig.sandbox.config.accounts[0].account_id, access=True)
    account_id = next(iter((await rig.app[STORE].snapshot()).accounts))
    await rig.app[STORE].update(lambda d: d.accounts.__setitem__(
        account_id, d.accounts[account_id].needing_reauth("token_revoked: amoCRM revoked the refresh token")))
    await sign_in(rig)
    html = await (await rig.client.get(CONSOLE)).text()
    assert 'data-tone="red"' in html and "Reconnect needed" in html and "amoCRM revoked the tokens" in html


def test_states_map_to_green_amber_red() -> None:
    """Connected and healthy is green; a last error, a stale access token or a long-lived token near its end
    is amber; reauth_required and expired are red."""
    base: dict[str, Any] = {"state": "connected", "access_expires_in": 3600, "long_lived": False, "last_error": None}
    assert state_of(base)[0] == "green"
    assert state_of({**base, "last_error": "upstream_unavailable"})[0] == "amber"
    assert state_of({**base, "access_expires_in": 0})[0] == "amber"
    assert state_of({**base, "long_lived": True, "access_expires_in": 86400 * 3})[0] == "amber"
    assert state_of({**base, "state": "reauth_required"})[0] == "red"
    assert state_of({**base, "state": "expired"})[0] == "red"


async def test_connect_opens_amocrm_consent_and_the_callback_answers_the_popup(make_rig: RigFactory) -> None:
    """POST connect answers 303 to amoCRM's consent page (mode=post_message); amoCRM's redirect to the callback
    with that state gets an HTML page for the popup (popup.js, strict CSP), not the seed's JSON."""
    rig = await make_rig(auth_url=SANDBOX_CONSENT)
    _, csrf = await sign_in(rig)
    resp = await post(rig, "connect", {"csrf": csrf})
    assert resp.status == 303
    consent = resp.headers["Location"]
    assert consent.startswith(rig.settings.auth_url) and "mode=post_message" in consent
    back = await rig.client.session.get(consent, allow_redirects=False)
    assert back.status == 302
    callback = back.headers["Location"]
    answer = await rig.client.session.get(callback, allow_redirects=False)
    text = await answer.text()
    assert answer.status == 200 and answer.content_type == "text/html"
    assert 'data-outcome="connected"' in text and "/console/static/popup.js" in text
    assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
    again = await rig.client.session.get(callback, allow_redirects=False)  # the state is spent: seed's JSON 400
    assert again.status == 400 and (await again.json())["error"] == "invalid_state"


async def test_popup_hears_a_refusal_too(rig: Rig) -> None:
    """When the consent was declined, the popup page says so and posts the failure code."""
    _, csrf = await sign_in(rig)
    consent = (await post(rig, "connect", {"csrf": csrf})).headers["Location"]
    state = re.search(r"state=([^&]+)", consent).group(1)  # type: ignore[union-attr]
    answer = await rig.client.get(f"/api/v1/integrations/amo-crm/callback?error=access_denied&state={state}")
    text = await answer.text()
    assert answer.status == 400 and answer.content_type == "text/html"
    assert 'data-outcome="failed"' in text and 'data-code="consent_denied"' in text


async def test_forget_asks_first_then_forgets(rig: Rig) -> None:
    """Forget shows a confirmation page and keeps the account; the confirmation removes it and audits it."""
    await rig.connect()
    _, csrf = await sign_in(rig)
    account_id = next(iter((await rig.app[STORE].snapshot()).accounts))
    page = await post(rig, "forget", {"csrf": csrf, "account": account_id})
    assert page.status == 200 and "Yes, forget it" in await page.text()
    assert account_id in (await rig.app[STORE].snapshot()).accounts
    done = await post(rig, "forget", {"csrf": csrf, "account": account_id, "confirmed": "1"})
    assert done.headers["Location"].endswith("?notice=forgotten")
    assert not (await rig.app[STORE].snapshot()).accounts
    html = await (await rig.client.get(CONSOLE)).text()
    assert "account.forgotten" in html


async def test_alerts_panel_shows_the_history_or_says_none(rig: Rig) -> None:
    """Without an alert history: "No alerts recorded."; with one wired, its alerts, newest first."""
    await sign_in(rig)
    assert "No alerts recorded." in await (await rig.client.get(CONSOLE)).text()

    async def history(account_id: str | None) -> list[dict[str, Any]]:
        return [{"event": "reauth_required", "account_id": "1", "subdomain": "demo", "reason": "token_revoked",
                 "at": 1_800_000_000, "status": "delivered", "signature": "must-not-show"},
                {"event": "recovered", "account_id": "1", "subdomain": "demo", "reason": None,
                 "at": 1_800_000_600, "status": "pending"}]

    rig.app._state[ALERT_HISTORY] = history  # the app is frozen once running; the alert outbox sets it at build
    html = await (await rig.client.get(CONSOLE)).text()
    assert "No alerts recorded." not in html and "must-not-show" not in html
    assert html.index("recovered") < html.index("reauth_required")


@pytest.mark.parametrize("path", ["console.js", "popup.js", "console.css"])
async def test_static_files_are_served(rig: Rig, path: str) -> None:
    resp = await rig.client.get(f"{CONSOLE}/static/{path}")
    assert resp.status == 200 and resp.headers["X-Content-Type-Options"] == "nosniff"
    assert (await rig.client.get(f"{CONSOLE}/static/other.js")).status == 404


async def test_audit_panel_reads_only_the_trails_tail(rig: Rig) -> None:
    """A long trail is not read whole: the panel shows its newest events (newest first), from the tail."""
    await sign_in(rig)
    path = audit_path(rig.settings.vault_path)
    await rig.app[AUDIT].flush()
    old = "".join(f'{{"ts":"2026-01-01T00:00:00.000Z","event":"old.event","n":{i}}}\n' for i in range(5000))
    with path.open("a", encoding="utf-8") as trail:
        trail.write(old + '{"ts":"2026-01-02T00:00:00.000Z","event":"newest.event"}\n')
    html = await (await rig.client.get(CONSOLE)).text()
    assert html.index("newest.event") < html.index("old.event")
    assert "n=4999" in html and "n=0<" not in html


async def test_the_console_lists_the_alerts_the_outbox_recorded(make_rig: RigFactory) -> None:
    """With alerts configured, a revoked account's reauth_required alert shows in the console's panel."""
    rig = await make_rig(alert_webhook_url="http://127.0.0.1:9/hook",
                         alert_webhook_secret="hook-secret-for-the-console-test")
    await rig.connect()
    rig.sandbox.revoke(ACCOUNT)
    account = str(ACCOUNT)
    stored = await rig.app[STORE].account(account)
    assert stored is not None and stored.tokens is not None
    await rig.app[MANAGER].refresh(account, seen=stored.tokens.access_token)
    await sign_in(rig)
    for _ in range(100):  # the alert service records the outcome from its own task
        html = await (await rig.client.get(CONSOLE)).text()
        if "No alerts recorded." not in html:
            break
        await asyncio.sleep(0.05)
    assert "No alerts recorded." not in html
    assert "reauth_required" in html and "hook-secret-for-the-console-test" not in html
