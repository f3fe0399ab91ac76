"""The console's handlers: sign-in, the page, and the operator's actions, each behind the session and CSRF.

A state-changing request needs the session cookie (HttpOnly, SameSite=Strict, Secure behind TLS) AND the
CSRF token of that session in its form; a request a browser marks as cross-site is refused before either is
looked at. Refusals of forged requests are the gateway's JSON errors; everyday outcomes (a wrong token, an
expired session, an exchange amoCRM refused) come back to the page as a 303 and a line of text.
"""

from __future__ import annotations

import asyncio
import json
import re
from importlib import resources
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from amo_gateway.accounts import account_summary, select_account
from amo_gateway.console import pages, session
from amo_gateway.console.i18n import Texts, choose_language
from amo_gateway.errors import BadRequest, Forbidden, GatewayError
from amo_gateway.inputs import ExchangeBody, query_param
from amo_gateway.typedefs import ALERT_HISTORY, AUDIT, CLOCK, FLOWS, REFRESHER, SETTINGS, STORE, TEST_CACHE

COOKIE = "amo_console"
LOGIN_COOKIE = "amo_console_login"
AUDIT_ROWS = 25
ALERT_ROWS = 25
# The longest value each form field may have (as openapi.json says); anything longer is a 400, never cut.
FIELD_LIMITS = {"csrf": 128, "token": 512, "login": 254, "api_key": 512, "account": 253, "confirmed": 1}
_MAX_FIELD = 2048
_MAX_PARAM = 64
_CODE = re.compile(r"[a-z_]{1,40}")
_ACCOUNT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NOTICES = ("connected", "exchange_requested", "forgotten", "logged_out")


def texts(request: web.Request) -> Texts:
    """The reader's language, from Accept-Language."""
    return Texts(choose_language(request.headers.get("Accept-Language")))


def security_headers(request: web.Request, response: web.StreamResponse, *, popup: bool = False) -> None:
    """A strict CSP (scripts and styles only from this origin's files), no framing, no caching, no referrer."""
    form_action = "'none'" if popup else f"'self' {_origin(request.app[SETTINGS].auth_url)}".rstrip()
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        f"form-action {form_action}; base-uri 'none'; frame-ancestors 'none'")
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    if not popup:  # the consent popup must keep its opener across amoCRM's origin to report back
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin-allow-popups"


def html(request: web.Request, text: str, *, status: int = 200, popup: bool = False) -> web.Response:
    response = web.Response(text=text, status=status, content_type="text/html", charset="utf-8")
    security_headers(request, response, popup=popup)
    return response


def popup_response(request: web.Request, *, ok: bool, account_id: str | None = None, code: str | None = None,
                   status: int = 200) -> web.Response:
    """The callback's answer to a consent popup the console opened (see pages.popup_page)."""
    page = pages.popup_page(texts(request), ok=ok, account_id=account_id, code=code)
    return html(request, page, status=status, popup=True)


async def console(request: web.Request) -> web.Response:
    """GET /console: the dashboard for a signed-in operator, the sign-in form for anyone else."""
    key = _key(request)
    found = session.verify(key, request.cookies.get(COOKIE), request.app[CLOCK].time()) if key else None
    if key is None or found is None:
        return _login_form(request, key)
    tx = texts(request)
    now = request.app[CLOCK].time()
    data = await request.app[STORE].snapshot(recheck=True)
    summaries = [account_summary(a, now) for a in data.accounts.values()]
    notice = _notice(request, tx)
    page = pages.dashboard(tx, session.csrf_token(key, found.sid), accounts=summaries,
                           alerts=await _alerts(request), audit=await _audit(request), notice=notice, now=now,
                           refresh_after=5 if request.query.get("notice") == "exchange_requested" else None)
    return html(request, page)


async def login(request: web.Request) -> web.Response:
    """POST /console/login: the operator token from the form; a session cookie on success."""
    key = _key(request)
    form = await _form(request)
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if key is None or not nonce or not session.csrf_ok(key, nonce, form.get("csrf")):
        raise Forbidden("the sign-in form is stale or was not sent from the console; reload it", code="csrf_failed")
    admin = request.app[SETTINGS].secret("admin_token") or ""
    if not session.constant_equal(form.get("token", "").strip(), admin):
        request.app[AUDIT].record("console.login_refused", by="console")
        await asyncio.sleep(0.5)  # a guess costs time; nginx's limit on this location does the rest
        raise _back("error", "bad_token")
    settings = request.app[SETTINGS]
    value = session.issue(key, request.app[CLOCK].time(), settings.console_session_hours * 3600)
    response = _redirect(pages.CONSOLE)
    _set_cookie(request, response, COOKIE, value, int(settings.console_session_hours * 3600))
    response.del_cookie(LOGIN_COOKIE, path=pages.CONSOLE)
    request.app[AUDIT].record("console.login", by="console")
    return response


async def logout(request: web.Request) -> web.Response:
    """POST /console/logout: the cookie is dropped (it also dies by itself at its expiry)."""
    await _guard(request)
    response = _redirect(f"{pages.CONSOLE}?notice=logged_out")
    response.del_cookie(COOKIE, path=pages.CONSOLE)
    return response


async def connect(request: web.Request) -> web.Response:
    """POST /console/connect (into the popup): 303 to amoCRM's consent page with a console state."""
    form = await _guard(request)
    url = await request.app[FLOWS].authorize_url("console", popup=True)
    request.app[AUDIT].record("console.connect", account=_account_field(form), by="console")
    return _redirect(url)


async def exchange(request: web.Request) -> web.Response:
    """POST /console/exchange: the seed's API-key exchange from the form; the key is sent on, never kept."""
    form = await _guard(request)
    fields = {k: form.get(k, "").strip() for k in ("login", "api_key")}
    try:
        body = ExchangeBody.model_validate(fields)
    except ValueError:
        raise _back("error", "invalid_body") from None
    account = _account_field(form)
    try:
        with request.app[AUDIT].outcome("exchange.requested", "exchange.refused", secrets={"api_key": body.api_key},
                                        login=body.login, label="console", account=account):
            await request.app[FLOWS].exchange_api_key(body.login, body.api_key, "console", account)
    except GatewayError as err:
        raise _back("error", err.code) from None
    raise _back("notice", "exchange_requested")


async def forget(request: web.Request) -> web.Response:
    """POST /console/forget: a confirmation page first; with `confirmed=1`, the account leaves the vault."""
    form = await _guard(request)
    store = request.app[STORE]
    data = await store.snapshot(recheck=True)
    try:
        account_id = select_account(data, _account_field(form) or "-")
    except GatewayError:
        raise _back("error", "not_found") from None
    if form.get("confirmed") != "1":
        summary = account_summary(data.accounts[account_id], request.app[CLOCK].time())
        return html(request, pages.forget_page(texts(request), form.get("csrf", ""), summary))
    await store.forget(account_id)
    request.app[AUDIT].record("account.forgotten", account=account_id, by="console")
    request.app[TEST_CACHE].clear()
    request.app[REFRESHER].wake()
    raise _back("notice", "forgotten")


async def static(request: web.Request) -> web.StreamResponse:
    """GET /console/static/{name}: the console's script, popup script and stylesheet (package data)."""
    name = request.match_info["name"]
    kind = _STATIC.get(name)
    if kind is None:
        raise web.HTTPNotFound()
    body = await asyncio.to_thread(_read_static, name)
    response = web.Response(body=body, content_type=kind, charset="utf-8")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-cache"
    return response


_STATIC = {"console.js": "text/javascript", "popup.js": "text/javascript", "console.css": "text/css"}


def _read_static(name: str) -> bytes:
    return resources.files("amo_gateway.console").joinpath("static", name).read_bytes()


def _key(request: web.Request) -> bytes | None:
    """The session key; None when no operator token is configured (the console is off)."""
    admin = request.app[SETTINGS].secret("admin_token")
    if not admin:
        return None
    return session.session_key(request.app[STORE].keys.keys[0], admin)


async def _guard(request: web.Request) -> MultiDictProxy[str]:
    """The form of a state-changing request that passed the checks: same site, a CSRF token, a signed session,
    and the token being that session's. Malformed or token-less posts are refused before the session is read."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        raise Forbidden("the browser says this request came from another site", code="csrf_failed")
    form = await _form(request)
    if not form.get("csrf"):
        raise Forbidden("the form carries no CSRF token; reload the console", code="csrf_failed")
    key = _key(request)
    found = session.verify(key, request.cookies.get(COOKIE), request.app[CLOCK].time()) if key else None
    if key is None or found is None:
        raise _back("notice", "session_expired")
    if not session.csrf_ok(key, found.sid, form.get("csrf")):
        raise Forbidden("the form carries no valid CSRF token for this session; reload the console",
                        code="csrf_failed")
    return form


async def _form(request: web.Request) -> MultiDictProxy[str]:
    """The url-encoded form (what the console's forms send); oversized or repeated fields are refused."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise BadRequest("the console takes HTML form posts (application/x-www-form-urlencoded)",
                         code="invalid_body")
    try:
        posted = await request.post()
    except ValueError:  # e.g. bytes that are not UTF-8
        raise BadRequest("the form could not be decoded", code="invalid_body") from None
    fields: MultiDict[str] = MultiDict()
    for name, value in posted.items():
        if not isinstance(value, str) or len(value) > FIELD_LIMITS.get(name, _MAX_FIELD) or name in fields:
            raise BadRequest(f"form field {name[:64]!r} is repeated or too long", code="invalid_parameter")
        fields.add(name, value)
    return MultiDictProxy(fields)


def _account_field(form: MultiDictProxy[str]) -> str | None:
    value = form.get("account", "").strip()
    return value[:253] or None


def _login_form(request: web.Request, key: bytes | None) -> web.Response:
    """The sign-in page, with a fresh pre-login nonce cookie that its CSRF token is bound to."""
    nonce = session.new_nonce()
    csrf = session.csrf_token(key, nonce) if key else ""
    tx = texts(request)
    hours = request.app[SETTINGS].console_session_hours
    page = pages.login_page(tx, csrf, _notice(request, tx), hours, key is not None)
    response = html(request, page)
    _set_cookie(request, response, LOGIN_COOKIE, nonce, 3600)
    return response


def _set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    """HttpOnly, SameSite=Strict, scoped to the console's path; Secure whenever the browser came over TLS."""
    response.set_cookie(name, value, max_age=max_age, path=pages.CONSOLE, httponly=True, samesite="Strict",
                        secure=request.secure)


def _notice(request: web.Request, tx: Texts) -> tuple[str, str] | None:
    """The line a redirect asked for (`?notice=` or `?error=`), from known codes only."""
    notice, error, during, account = (_short_param(request, name) for name in ("notice", "error", "during", "account"))
    if notice == "session_expired":
        return "error", tx.t("notice_session_expired")
    if notice in _NOTICES:
        return "ok", tx.t(f"notice_{notice}", account=account if _ACCOUNT.fullmatch(account) else "")
    if _CODE.fullmatch(error):
        detail = tx.error(error)
        return "error", tx.t("notice_connect_failed", detail=detail) if during else detail
    return None


def _short_param(request: web.Request, name: str) -> str:
    """A status-line parameter: a short code (the pages only ever link with such), else a 400."""
    value = query_param(request, name) or ""
    if len(value) > _MAX_PARAM:
        raise BadRequest(f"query parameter {name!r} is too long", code="invalid_parameter")
    return value


def _back(kind: str, code: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"{pages.CONSOLE}?{urlencode({kind: code})}")


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


async def _alerts(request: web.Request) -> list[dict[str, Any]] | None:
    """The alert history, when this gateway records one (the alert outbox wires ALERT_HISTORY)."""
    history = request.app.get(ALERT_HISTORY)
    if history is None:
        return None
    return pages.rows_newest_first(await history(None), ALERT_ROWS)


async def _audit(request: web.Request) -> list[dict[str, Any]]:
    """The trail's last records, newest first; only its tail is read (the trail only grows).

    Events still queued for the writer are written first, so the page shows what the operator just did.
    """
    records = []
    for line in await request.app[AUDIT].recent(AUDIT_ROWS):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return pages.rows_newest_first(records, AUDIT_ROWS)
