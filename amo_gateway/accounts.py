"""Which amoCRM account a request means, and which hosts may be trusted as account hosts. Pure functions."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from amo_gateway.errors import BadRequest, NotConnected, NotFound, RefererRefused
from amo_gateway.settings import Settings
from amo_gateway.tokens import CONNECTED, Account, VaultData

DEFAULT_ACCOUNT = "default"
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # one DNS label, ASCII only (amoCRM subdomains)


def host_of(value: str) -> str:
    """`sub.amocrm.ru`, `https://sub.amocrm.ru/x` or `127.0.0.1:8099` -> the lower-case host[:port].

    '' when the value names no host at all (`[`, `ex\uff0fample`): callers treat that as not allowed.
    """
    text = value.strip()
    try:
        netloc = urlsplit(text if "//" in text else f"//{text}").netloc
    except ValueError:  # urlsplit refuses `[` and hosts that NFKC-normalise into separators, e.g. a fullwidth /
        return ""
    return netloc.lower().rstrip(".")


def account_url(template: str, host: str) -> str:
    """The base URL of an account host: `https://{host}` in production (a stand-in may map it elsewhere)."""
    return template.format(host=host_of(host)).rstrip("/")


def configured_hosts(settings: Settings) -> set[str]:
    """The configured account's host names: AMO_DOMAIN, and the host of AMO_BASE_URL that reaches it."""
    values = (settings.domain, settings.account_base_url)
    return {host for value in values if value and (host := host_of(value))}


def amo_subdomain(host: str, base_domains: Iterable[str]) -> str | None:
    """The subdomain when `host` is exactly `{sub}.{allowed base domain}` (no port, no `www`), else None."""
    for base in base_domains:
        suffix = "." + base.lower()
        sub = host[: -len(suffix)] if host.endswith(suffix) else ""
        if _LABEL.fullmatch(sub) and sub != "www":
            return sub
    return None


def account_subdomain(base_url: str, settings: Settings) -> str | None:
    """The amoCRM subdomain of the account reached at `base_url`, or None when nothing names one.

    From the host when it is `{sub}.{allowed base domain}`; otherwise, for the configured account reached
    elsewhere (the sandbox at 127.0.0.1:8081, a mirror), from AMO_DOMAIN: never the first label of an IP.
    """
    sub = amo_subdomain(_hostname(base_url), settings.allowed_base_domains)
    if sub is None and settings.domain and base_url.rstrip("/") == settings.account_base_url:
        named = _hostname(settings.domain)
        sub = amo_subdomain(named, settings.allowed_base_domains) or named.split(".", 1)[0] or None
    return sub


def _hostname(value: str) -> str:
    """`http://acme.amocrm.ru:8443/x` -> `acme.amocrm.ru` (no port); '' when it names no host."""
    return host_of(value).rpartition("@")[2].split(":", 1)[0] if not host_of(value).startswith("[") else ""


def account_hosts(account: Account, settings: Settings) -> frozenset[str]:
    """Every name amoCRM may write the account's links on: the host called, `{sub}.{base domain}`, AMO_DOMAIN."""
    hosts = {host_of(account.base_url)}
    if account.subdomain:
        hosts |= {f"{account.subdomain}.{base}".lower() for base in settings.allowed_base_domains}
    if account.base_url.rstrip("/") == settings.account_base_url:
        hosts |= configured_hosts(settings)
    return frozenset(h for h in hosts if h)


def multi_account(settings: Settings) -> bool:
    """True when callbacks may connect accounts beyond the configured one."""
    return settings.any_account or bool(settings.allowed_accounts)


def base_url_for_referer(referer: str, settings: Settings) -> str:
    """The account base URL a callback's `referer` names, or RefererRefused before any token call."""
    host = host_of(referer)
    configured = settings.account_base_url
    # AMO_DOMAIN is the account's name even when AMO_BASE_URL reaches it elsewhere (a stand-in, a mirror).
    if configured and host and host in configured_hosts(settings):
        return configured
    if multi_account(settings) and _allowed_account_host(host, settings):
        return account_url(settings.account_url_template, host)
    raise RefererRefused("the callback's referer is not an allowed amoCRM account host")


def _allowed_account_host(host: str, settings: Settings) -> bool:
    """An amoCRM/Kommo account host `{sub}.{base domain}` from the allow-list, and an allowed account."""
    sub = amo_subdomain(host, settings.allowed_base_domains)
    if sub is None:
        return False
    return settings.any_account or sub in settings.allowed_accounts or host in settings.allowed_accounts


def display_state(account: Account, now: float) -> str:
    """`connected`, `reauth_required`, or `expired` for a long-lived token past its expiry (never refreshed)."""
    pair = account.tokens
    if account.status == CONNECTED and account.long_lived and pair is not None and pair.expires_at <= now:
        return "expired"
    return account.status


def account_summary(account: Account, now: float) -> dict[str, Any]:
    """What operators see of an account (CLI `status`, GET /accounts): never a token."""
    pair = account.tokens
    return {
        "account_id": account.account_id,
        "host": account.base_url,
        "subdomain": account.subdomain,
        "state": display_state(account, now),
        "reason": account.reason,
        "long_lived": account.long_lived,
        "access_expires_at": int(pair.expires_at) if pair else None,
        "access_expires_in": max(int(pair.expires_at - now), 0) if pair else None,
        "refresh_token_age_days": round((now - account.refresh_obtained_at) / 86400, 2)
        if account.refresh_obtained_at and not account.long_lived else None,
        "refresh_in_flight": account.in_flight is not None,
        "last_error": account.last_error,
    }


def select_account(data: VaultData, selector: str | None) -> str:
    """The account id that `?account=` (id or subdomain) names; may be left out when only one is stored."""
    if selector:
        if selector in data.accounts:
            return selector
        for account_id, account in data.accounts.items():
            if account.subdomain and account.subdomain.lower() == selector.lower():
                return account_id
        raise NotFound("no connected account has that id or subdomain")
    if len(data.accounts) == 1:
        return next(iter(data.accounts))
    if not data.accounts:
        raise NotConnected("no amoCRM account is connected; run the API-key exchange or the consent flow")
    raise BadRequest("several accounts are connected: say which with ?account=<id or subdomain>",
                     code="account_required")
