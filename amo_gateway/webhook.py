"""Alert delivery: the signed webhook POST and the optional Telegram message. No state here.

The webhook body is the alert's JSON, sent as is, with
`X-Amo-Gateway-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`. Telegram's
`sendMessage` carries the bot token in its URL path, so no URL, and no exception text that could quote one,
ever reaches a log line or an error detail: failures are named by type and status only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from amo_gateway.settings import Settings

SIGNATURE_HEADER = "X-Amo-Gateway-Signature"
WEBHOOK, TELEGRAM = "webhook", "telegram"


class DeliveryFailed(Exception):
    """A target did not take the alert (no answer, or a non-2xx one); `why` is safe to log."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header's value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance: float = 300.0) -> bool:
    """What a receiver does (the README shows it in five lines): recompute, compare in constant time, check age."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if not fields.get("t", "").isdigit() or abs(now - int(fields["t"])) > tolerance:
        return False
    expected = sign(secret, body, int(fields["t"])).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def encode(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed and sent."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


class Target(Protocol):
    """Somewhere an alert goes."""

    @property
    def name(self) -> str: ...

    async def send(self, session: aiohttp.ClientSession, payload: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class Webhook:
    """The signed JSON POST to AMO_ALERT_WEBHOOK_URL."""

    url: str
    secret: str
    name: str = WEBHOOK

    def __repr__(self) -> str:  # never show the secret
        return "Webhook(<url>, <secret>)"

    async def send(self, session: aiohttp.ClientSession, payload: Mapping[str, Any]) -> None:
        """Signed with the wall-clock time of sending: the receiver checks it against its own clock."""
        body = encode(payload)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, body, int(time.time()))}
        await _post(session, self.url, body, headers)


@dataclass(frozen=True)
class Telegram:
    """Telegram's `sendMessage` to AMO_ALERT_TELEGRAM_CHAT_ID; the bot token lives in the URL path."""

    api_url: str
    bot_token: str
    chat_id: str
    name: str = TELEGRAM

    def __repr__(self) -> str:  # never show the bot token
        return "Telegram(<bot token>)"

    async def send(self, session: aiohttp.ClientSession, payload: Mapping[str, Any]) -> None:
        url = f"{self.api_url.rstrip('/')}/bot{self.bot_token}/sendMessage"
        body = json.dumps({"chat_id": self.chat_id, "text": message(payload), "disable_web_page_preview": True})
        await _post(session, url, body.encode(), {"Content-Type": "application/json"})


def message(payload: Mapping[str, Any]) -> str:
    """The alert as a few plain lines for people (no markup: nothing to escape, nothing to inject)."""
    who = payload.get("subdomain") or payload.get("account_id")
    head = f"amo-gateway: {payload['event']}{' (reminder)' if payload.get('reminder') else ''} - {who}"
    lines = [head, str(payload.get("reason") or ""), f"Fix: {payload.get('reconnect') or '-'}",
             f"account {payload.get('account_id')}, at {payload.get('at')}"]
    return "\n".join(line for line in lines if line)


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> None:
    """POST; anything but a 2xx answer is DeliveryFailed with a reason that names no URL."""
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            await resp.read()
            if not 200 <= resp.status < 300:
                raise DeliveryFailed(f"answered {resp.status}")
    except aiohttp.ClientError as err:  # its text may quote the URL (Telegram's holds the bot token)
        raise DeliveryFailed(type(err).__name__) from None
    except TimeoutError:
        raise DeliveryFailed("timeout") from None


def targets(settings: Settings) -> list[Target]:
    """The configured targets, in delivery order."""
    found: list[Target] = []
    if settings.alert_webhook_url:
        found.append(Webhook(settings.alert_webhook_url, settings.secret("alert_webhook_secret") or ""))
    token = settings.secret("alert_telegram_bot_token")
    if token and settings.alert_telegram_chat_id:
        found.append(Telegram(settings.alert_telegram_api_url, token, settings.alert_telegram_chat_id))
    return found
