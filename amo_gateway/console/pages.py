"""The console's HTML, rendered on the server from plain data: every value escaped, no inline script or style.

Pages get only what `account_summary`, the audit trail and the alert history hold, none of which carries a
token, code, API key or secret; the forms never echo what was typed into them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from html import escape
from string import Template
from typing import Any

from amo_gateway.console.i18n import Texts
from amo_gateway.settings import PREFIX

CONSOLE = f"{PREFIX}/console"
STATIC = f"{CONSOLE}/static"
POPUP_WINDOW = "amo-consent"  # the consent popup's window name: console.js opens it, forms target it
_SOON = 14 * 86400  # a long-lived token this close to its end is amber (the alerts' first warning too)

_SHELL = Template("""<!doctype html>
<html lang="$lang">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>$title</title>
<link rel="stylesheet" href="$static/console.css">
<script src="$static/$script" defer></script>
</head>
<body class="$body_class"$data>
$body
</body>
</html>
""")


def h(value: object) -> str:
    """Escape for HTML text and attribute values."""
    return escape(str(value), quote=True)


def shell(tx: Texts, body: str, *, script: str = "console.js", body_class: str = "",
          data: dict[str, str] | None = None) -> str:
    """A whole page around `body`; `data` becomes data-* attributes of <body> (how pages talk to the script)."""
    attrs = "".join(f' data-{h(k)}="{h(v)}"' for k, v in (data or {}).items())
    return _SHELL.substitute(lang=tx.lang, title=h(tx.t("title")), static=STATIC, script=script,
                             body_class=body_class, data=attrs, body=body)


def notice_html(notice: tuple[str, str] | None) -> str:
    """A status line: `("ok"|"error", text)`; announced to screen readers."""
    if notice is None:
        return ""
    kind, text = notice
    return f'<p class="notice {h(kind)}" role="status">{h(text)}</p>'


def login_page(tx: Texts, csrf: str, notice: tuple[str, str] | None, hours: float, enabled: bool) -> str:
    """The sign-in form: the operator token, posted with the pre-login CSRF token."""
    form = (f'<form method="post" action="{CONSOLE}/login" class="stack">'
            f'<input type="hidden" name="csrf" value="{h(csrf)}">'
            f'<label for="token">{h(tx.t("token_label"))}</label>'
            '<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>'
            f'<button class="primary" type="submit">{h(tx.t("sign_in"))}</button></form>')
    if not enabled:
        form, notice = "", ("error", tx.t("console_off"))
    body = (f'<main class="login card"><h1>{h(tx.t("title"))}</h1>{notice_html(notice)}'
            f'<p class="muted">{h(tx.t("login_hint", hours=_number(hours)))}</p>{form}</main>')
    return shell(tx, body, body_class="narrow")


def dashboard(tx: Texts, csrf: str, *, accounts: list[dict[str, Any]], alerts: list[dict[str, Any]] | None,
              audit: list[dict[str, Any]], notice: tuple[str, str] | None, now: float,
              refresh_after: int | None = None) -> str:
    """The console: accounts first (the thing to act on), then the exchange form, alerts and the audit tail."""
    header = (f'<header class="bar"><div><h1>{h(tx.t("title"))}</h1>'
              f'<span class="muted">{h(tx.t("shown_at", when=_clock(now)))}</span></div>'
              f'{_post_form("logout", csrf, tx.t("sign_out"), cls="link")}</header>')
    cards = "".join(account_card(tx, csrf, a) for a in accounts) or f'<p class="empty">{h(tx.t("no_accounts"))}</p>'
    connect = _post_form("connect", csrf, tx.t("connect"), cls="primary", popup=True)
    body = (f'{header}<main>{notice_html(notice)}'
            f'<p class="notice error" role="alert" id="popup-blocked" hidden>{h(tx.t("popup_blocked"))}</p>'
            f'<section><div class="section-head"><h2>{h(tx.t("accounts"))}</h2>{connect}</div>'
            f'<div class="cards">{cards}</div></section>'
            f'{exchange_form(tx, csrf, open_=not accounts)}{alerts_table(tx, alerts)}{audit_table(tx, audit)}</main>')
    data = {"refresh": str(refresh_after)} if refresh_after else None
    return shell(tx, body, data=data)


def state_of(summary: dict[str, Any]) -> tuple[str, str]:
    """(tone, label key): green when all is well, amber when it works but needs a look, red when it does not."""
    state = summary.get("state")
    if state in ("reauth_required", "expired"):
        return "red", f"state_{state}"
    left = summary.get("access_expires_in")
    ending = summary.get("long_lived") and left is not None and left < _SOON
    stale = not summary.get("long_lived") and left == 0  # refreshes have been failing past the access expiry
    if summary.get("last_error") or ending or stale:
        return "amber", "state_attention"
    return "green", "state_connected"


def account_card(tx: Texts, csrf: str, summary: dict[str, Any]) -> str:
    """One account: a coloured state, the facts an operator asks first, and what can be done about it."""
    tone, label = state_of(summary)
    account = str(summary["account_id"])
    host = _host(summary.get("host"))
    reason = summary.get("reason")
    if tone == "red":  # the stored pair is dead: its expiry and age would only mislead
        facts = [(tx.t("why"), _reason(tx, str(reason or summary.get("state"))))]
    else:
        facts = [(tx.t("access_expires"), _expiry(tx, summary)), (tx.t("refresh_age"), _age(tx, summary))]
    if summary.get("last_error") and summary["last_error"] != reason:
        facts.append((tx.t("last_error"), h(_clip(str(summary["last_error"]), 200))))
    if summary.get("refresh_in_flight"):
        facts.append(("", h(tx.t("refreshing"))))
    rows = "".join(f"<dt>{h(k)}</dt><dd>{v}</dd>" for k, v in facts)
    hint = f'<p class="hint">{h(tx.t("fix_hint"))}</p>' if tone == "red" else ""
    reconnect = _post_form("connect", csrf, tx.t("reconnect"), cls="primary" if tone == "red" else "secondary",
                           popup=True, fields={"account": account})
    forget = _post_form("forget", csrf, tx.t("forget"), cls="link danger", fields={"account": account})
    return (f'<article class="card tone-{tone}" data-account="{h(account)}" data-tone="{tone}">'
            f'<div class="card-head"><span class="badge {tone}"><span class="dot" aria-hidden="true"></span>'
            f'{h(tx.t(label))}</span><h3>{h(host)}</h3>'
            f'<span class="muted">{h(tx.t("account_id"))} {h(account)}</span></div>'
            f'<dl class="facts">{rows}</dl>{hint}<div class="actions">{reconnect}{forget}</div></article>')


def exchange_form(tx: Texts, csrf: str, *, open_: bool) -> str:
    """The API-key exchange; the key field is a password field and is never filled back in."""
    return (f'<section><details class="card"{" open" if open_ else ""}><summary><h2>{h(tx.t("exchange_heading"))}'
            f'</h2></summary><p class="muted">{h(tx.t("exchange_hint"))}</p>'
            f'<form method="post" action="{CONSOLE}/exchange" class="stack" autocomplete="off">'
            f'<input type="hidden" name="csrf" value="{h(csrf)}">'
            f'<label for="login">{h(tx.t("login_field"))}</label>'
            '<input id="login" name="login" type="email" required maxlength="254" autocomplete="off">'
            f'<label for="api_key">{h(tx.t("api_key_field"))}</label>'
            '<input id="api_key" name="api_key" type="password" required maxlength="512" autocomplete="off">'
            f'<label for="account">{h(tx.t("account_field"))}</label>'
            '<input id="account" name="account" type="text" maxlength="253" autocomplete="off">'
            f'<button class="primary" type="submit">{h(tx.t("exchange_submit"))}</button></form></details></section>')


def alerts_table(tx: Texts, alerts: list[dict[str, Any]] | None) -> str:
    """The alerts the gateway sent (newest first); None when this gateway keeps no alert history."""
    head = [tx.t("col_time"), tx.t("col_account"), tx.t("col_event"), tx.t("col_reason"), tx.t("col_delivery")]
    rows = [[_when(a.get("at")), a.get("subdomain") or a.get("account_id"), a.get("event"), a.get("reason"),
             a.get("status")] for a in alerts or []]
    return _table_section(tx.t("alerts"), head, rows, tx.t("no_alerts"), "alerts")


def audit_table(tx: Texts, records: list[dict[str, Any]]) -> str:
    """The last audit events (newest first), digests of secrets left out."""
    head = [tx.t("col_time"), tx.t("col_event"), tx.t("col_account"), tx.t("col_details")]
    rows = [[str(r.get("ts", ""))[:19].replace("T", " "), r.get("event"), r.get("account"), _details(r)]
            for r in records]
    return _table_section(tx.t("audit"), head, rows, tx.t("no_audit"), "audit")


def forget_page(tx: Texts, csrf: str, summary: dict[str, Any]) -> str:
    """The confirmation step of forgetting an account: nothing is removed until this form is sent."""
    account = str(summary["account_id"])
    yes = _post_form("forget", csrf, tx.t("forget_yes"), cls="danger", fields={"account": account, "confirmed": "1"})
    body = (f'<main class="login card"><h1>{h(tx.t("forget_heading"))}</h1>'
            f'<p>{h(tx.t("forget_text", host=_host(summary.get("host")), account=account))}</p>'
            f'<div class="actions">{yes}<a class="button secondary" href="{CONSOLE}">{h(tx.t("cancel"))}</a>'
            "</div></main>")
    return shell(tx, body, body_class="narrow")


def popup_page(tx: Texts, *, ok: bool, account_id: str | None, code: str | None) -> str:
    """The callback's answer inside the consent popup: popup.js posts the outcome to the console and closes."""
    text = tx.t("popup_ok") if ok else tx.t("popup_failed", detail=tx.error(code or "other"))
    data = {"outcome": "connected" if ok else "failed", "account": account_id or "", "code": code or ""}
    body = f'<main class="login card"><p class="notice {"ok" if ok else "error"}">{h(text)}</p></main>'
    return shell(tx, body, script="popup.js", body_class="narrow", data=data)


def _post_form(action: str, csrf: str, label: str, *, cls: str, popup: bool = False,
               fields: dict[str, str] | None = None) -> str:
    target = f' target="{POPUP_WINDOW}"' if popup else ""
    hidden = "".join(f'<input type="hidden" name="{h(k)}" value="{h(v)}">' for k, v in (fields or {}).items())
    return (f'<form method="post" action="{CONSOLE}/{action}"{target} class="inline">'
            f'<input type="hidden" name="csrf" value="{h(csrf)}">{hidden}'
            f'<button class="{cls}" type="submit">{h(label)}</button></form>')


def _table_section(title: str, head: list[str], rows: list[list[Any]], empty: str, name: str) -> str:
    if not rows:
        return f'<section id="{name}"><h2>{h(title)}</h2><p class="empty">{h(empty)}</p></section>'
    header = "".join(f"<th>{h(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f'<td data-label="{h(head[i])}">{h(_text(c))}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return (f'<section id="{name}"><h2>{h(title)}</h2><div class="table"><table><thead><tr>{header}</tr></thead>'
            f"<tbody>{body}</tbody></table></div></section>")


def _details(record: dict[str, Any]) -> str:
    """The audit record's other plain fields as `key=value`; `*_hmac` digests are not for people."""
    parts = (f"{k}={_clip(str(v))}" for k, v in record.items()
             if k not in ("ts", "event", "account") and not k.endswith("_hmac") and v is not None
             and isinstance(v, (str, int, float, bool)))
    return " ".join(parts)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _host(base_url: object) -> str:
    return str(base_url or "").split("//", 1)[-1]


def _expiry(tx: Texts, summary: dict[str, Any]) -> str:
    at, left = summary.get("access_expires_at"), summary.get("access_expires_in")
    if at is None or left is None:
        return h(tx.t("none"))
    if left <= 0:
        return h(tx.t("expired_at", when=_clock(at)))
    return f'{h(tx.t("in", span=span(tx, left)))} <span class="muted">· {h(_clock(at))}</span>'


def _age(tx: Texts, summary: dict[str, Any]) -> str:
    if summary.get("long_lived"):
        return h(tx.t("long_lived"))
    days = summary.get("refresh_token_age_days")
    return h(tx.t("none")) if days is None else h(span(tx, float(days) * 86400))


def _reason(tx: Texts, reason: str) -> str:
    """A reauth reason in the reader's language (by its code), with amoCRM's own words kept small."""
    code = reason.split(":", 1)[0].strip()
    key = f"reason_{code}"
    known = tx.t(key) if key in _REASON_CODES else None
    return f'{h(known)} <code>{h(code)}</code>' if known else h(reason)


_REASON_CODES = frozenset(f"reason_{c}" for c in
                          ("token_revoked", "refresh_answer_lost", "refresh_rejected", "long_lived_expired", "expired"))


def span(tx: Texts, seconds: float) -> str:
    """A duration people read at a glance: `3 d 4 h`, `5 h 12 min`, `7 min`."""
    minutes = int(seconds // 60)
    d, h_, m = minutes // 1440, minutes % 1440 // 60, minutes % 60
    if d:
        return " ".join([tx.t("days", n=d)] + ([tx.t("hours", n=h_)] if h_ else []))
    if h_:
        return f'{tx.t("hours", n=h_)} {tx.t("minutes", n=m)}'
    return tx.t("minutes", n=m)


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(at))


def _when(at: object) -> str:
    """An alert's time: unix seconds or an ISO string."""
    if isinstance(at, (int, float)):
        return _clock(at)
    return str(at or "")[:19].replace("T", " ")


def _number(value: float) -> str:
    return f"{value:g}"


def rows_newest_first(records: Iterable[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The last `limit` records, newest first."""
    return list(records)[-limit:][::-1]
