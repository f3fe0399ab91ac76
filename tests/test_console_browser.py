"""The operator console in a real headless browser: Debian's chromium, driven by Playwright (never a downloaded
browser), against a real gateway process and a real sandbox process.

The story: the account was connected by the API-key exchange; amoCRM (the sandbox) then revoked its tokens and
the gateway found out. The operator signs in, sees the account red, presses Reconnect, amoCRM's consent window
opens as a popup, comes back through the callback, tells the console, closes, and the account is green. Along
the way: a POST without the CSRF token is refused in the browser itself; no token, code or secret is ever in the
DOM; the session cookie is invisible to scripts. Screenshots (desktop and phone width, English and Ukrainian)
land in var/screenshots/ for the README.

Without chromium or Playwright the test is skipped, except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from amo_gateway.settings import PREFIX
from amo_gateway.vault import KeyRing, Vault
from tests.conftest import free_port
from tests.deploy_procs import (
    API_KEY,
    LOGIN,
    ROOT,
    Credentials,
    Process,
    gateway_command,
    gateway_env,
    port_open,
    sandbox_command,
    wait_until,
)

pytestmark = pytest.mark.slow
CHROMIUM = next((p for p in (os.environ.get("AMO_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium")
                 if p and os.access(p, os.X_OK)), None)
# This machine's network is closed: without the background-networking flags Chromium's own connections are
# refused and slow everything down. --no-sandbox: the tests may run as root in a container.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "var" / "screenshots"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
FITS = "document.documentElement.scrollWidth <= window.innerWidth"  # no sideways scrolling
# If the page scrolls sideways, which elements stick out (tag.class, right edge): the failure names them.
OVERFLOWING = "() => " + FITS + """ ? [] :
    [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
      .map(e => `${e.tagName.toLowerCase()}.${e.className}: ${Math.round(e.getBoundingClientRect().right)}`)
      .concat([`scrollWidth ${document.documentElement.scrollWidth}, innerWidth ${window.innerWidth}`])"""


def _browser_or_skip() -> Any:
    """Playwright's sync API, or a skip (a failure in CI: the browser test must run there)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = "chromium (apt-get install chromium; `make test` does it)" if CHROMIUM is None else (
        "the playwright package (pip install -e '.[dev]')" if sync_playwright is None else None)
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test, but {missing} is missing")
        pytest.skip(f"no {missing}")
    return sync_playwright


@dataclass
class Live:
    """A gateway and a sandbox process on loopback."""

    gateway_port: int
    sandbox_port: int
    credentials: Credentials
    vault_path: Path

    @property
    def console(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}{PREFIX}/console"

    def call(self, method: str, url: str, body: dict[str, Any] | None = None, *, admin: bool = False) -> Any:
        headers = {"Content-Type": "application/json"}
        if admin:
            headers["Authorization"] = f"Bearer {self.credentials.admin_token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310  (loopback http URLs built here)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310  (the same)
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return json.loads(err.read() or b"null")

    def gateway(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.call(method, f"http://127.0.0.1:{self.gateway_port}{PREFIX}{path}", body, admin=True)

    def sandbox(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.call("POST" if body is not None else "GET", f"http://127.0.0.1:{self.sandbox_port}{path}", body)

    def states(self) -> list[str]:
        return [a["state"] for a in self.gateway("GET", "/accounts")["accounts"]]

    def secrets(self) -> list[str]:
        """Everything that must never reach the DOM: the vault's tokens, the operator token, the client secret."""
        key = (self.credentials.directory / "vault-key").read_text().strip()
        data, _ = Vault(self.vault_path, KeyRing([key])).read()
        found = [self.credentials.admin_token, self.credentials.client_secret, API_KEY]
        for account in data.accounts.values():
            if account.tokens is not None:
                found += [account.tokens.access_token, account.tokens.refresh_token or ""]
        return [s for s in found if s]


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    """The sandbox plays amoCRM, consent page included (AMO_AUTH_URL points at its /oauth)."""
    gateway_port, sandbox_port = free_port(), free_port()
    creds = Credentials(tmp_path / "credentials")
    creds.write()
    redirect = f"http://127.0.0.1:{gateway_port}{PREFIX}/callback"
    sandbox = Process.start("sandbox", sandbox_command(sandbox_port, creds.client_secret, redirect),
                            tmp_path / "sandbox.log")
    vault = tmp_path / "state" / "vault.enc"
    env = gateway_env(port=gateway_port, vault=vault, credentials=creds.directory, redirect_uri=redirect,
                      base_url=f"http://127.0.0.1:{sandbox_port}")
    env["AMO_AUTH_URL"] = f"http://127.0.0.1:{sandbox_port}/oauth"
    gateway = Process.start("gateway", gateway_command(), tmp_path / "gateway.log", env)
    try:
        wait_until("the sandbox", lambda: port_open(sandbox_port), 15, sandbox)
        wait_until("the gateway", lambda: port_open(gateway_port), 20, gateway)
        yield Live(gateway_port, sandbox_port, creds, vault)
    finally:
        gateway.stop()
        sandbox.stop()


def _revoked_account(live: Live) -> None:
    """Connected by the exchange, then revoked at amoCRM; a probe makes the gateway find out (reauth_required)."""
    assert live.gateway("POST", "/exchange-api-key", {"login": LOGIN, "api_key": API_KEY})["status"] == "accepted"
    wait_until("the exchange's callback", lambda: live.states() == ["connected"], 10)
    live.sandbox("/_sandbox/revoke", {"access": True})
    live.gateway("GET", "/test")
    wait_until("the gateway to see the revocation", lambda: live.states() == ["reauth_required"], 10)


def _shot(page: Any, name: str, size: dict[str, int]) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size(size)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def _context(playwright: Any, tmp_path: Path, viewport: dict[str, int], locale: str) -> Any:
    """Debian's chromium with a throwaway profile in the test's own directory."""
    return playwright.chromium.launch_persistent_context(tmp_path / "profile", executable_path=CHROMIUM, args=FLAGS,
                                                         headless=True, viewport=viewport, locale=locale)


def _assert_fits_the_screen(page: Any) -> None:
    """No sideways scrolling once the page has settled (its fonts loaded, layout done); else name what sticks out.

    Measured once right after the card appeared, this failed one loaded run in many with nothing to show for it:
    the check now waits up to 5 s for the settled layout and, if it never fits, says which elements overflow.
    """
    from playwright.sync_api import TimeoutError as Timeout  # present: the test got past _browser_or_skip

    page.evaluate("() => document.fonts.ready.then(() => true)")
    with contextlib.suppress(Timeout):  # never fits: the assertion below names the culprits
        page.wait_for_function(f"() => {FITS}", timeout=5000)
    wide = page.evaluate(OVERFLOWING)
    assert wide == [], f"wider than the {PHONE['width']} px screen: {wide}"


def _assert_no_secret(page: Any, secrets: list[str]) -> None:
    """Neither the DOM (rendered HTML, attributes, form values) nor script-visible cookies hold a secret."""
    dom = page.content() + page.evaluate("() => [...document.querySelectorAll('input')].map(i => i.value).join(' ')")
    for secret in secrets:
        assert secret not in dom
    assert page.evaluate("() => document.cookie") == ""  # the session cookie is HttpOnly


def test_operator_reconnects_a_revoked_account_through_the_consent_popup(live: Live, tmp_path: Path) -> None:
    """Sign in, see red, Reconnect in amoCRM's popup, see green; CSRF-less POST refused; no secret in the DOM."""
    sync_playwright = _browser_or_skip()
    _revoked_account(live)
    with sync_playwright() as p:
        context = _context(p, tmp_path, DESKTOP, "en-US")
        page = context.new_page()
        page.goto(live.console)
        page.fill("#token", live.credentials.admin_token)
        page.click("button[type=submit]")
        card = page.locator("article.card")
        assert card.get_attribute("data-tone") == "red"
        assert "Reconnect needed" in card.inner_text()
        _assert_no_secret(page, live.secrets())
        _shot(page, "console-reauth-desktop.png", DESKTOP)

        refused = page.evaluate("""async () => {
            const r = await fetch(location.pathname + '/connect', {method: 'POST', body: new URLSearchParams({})});
            return [r.status, (await r.json()).error]; }""")
        assert refused == [403, "csrf_failed"]

        with page.expect_popup() as opened:
            card.locator("button", has_text="Reconnect").click()
        popup = opened.value
        popup.wait_for_event("close", timeout=15000)
        page.wait_for_selector("article.card[data-tone=green]", timeout=15000)
        assert "is connected" in page.locator(".notice.ok").inner_text()
        assert live.states() == ["connected"]
        _assert_no_secret(page, live.secrets())
        _shot(page, "console-desktop.png", DESKTOP)
        _shot(page, "console-phone.png", PHONE)
        context.close()


def test_console_in_ukrainian_on_a_phone(live: Live, tmp_path: Path) -> None:
    """A Ukrainian browser gets the Ukrainian console; the phone-width page needs no sideways scrolling."""
    sync_playwright = _browser_or_skip()
    _revoked_account(live)
    with sync_playwright() as p:
        context = _context(p, tmp_path, PHONE, "uk-UA")
        page = context.new_page()
        page.goto(live.console)
        assert "Токен оператора" in page.inner_text("body")
        page.fill("#token", live.credentials.admin_token)
        page.click("button[type=submit]")
        assert "Потрібне перепідключення" in page.locator("article.card").inner_text()
        _assert_fits_the_screen(page)
        _shot(page, "console-uk-phone.png", PHONE)
        context.close()
