"""Alert state: which conditions hold for which account, and which alerts a change of them gives. Pure, no I/O.

A condition is derived from durable facts wherever one exists, so every process on a vault derives the same:

- `reauth_required`: the vault's account is `reauth_required` (`token_revoked`, `refresh_answer_lost`,
  `refresh_rejected`, ...), or its long-lived token has expired (`long_lived_expired`);
- `long_lived_expiring`: a long-lived token expires within 14, then 3, then 1 day (each stage alerts once);
- `refresh_failing`: refreshes have failed transiently since `failing_since` for longer than a threshold;
- `breaker_open`: a process's breaker for the account is open (process memory: each process asserts its own).

Each condition has an *episode*, what tells one occurrence from the next (the account's `connected_at` for a
re-authorization: a reconnect starts a new one). `reconcile` compares the conditions with the `active` record
kept in the outbox (under its lock) and returns the alerts to send: one when a condition starts or its
episode changes, a reminder every `reminder_interval` while it lasts, `recovered` / `breaker_closed` when it
ends. Refresh outcomes and breaker changes seen by this process are also fed in as events, so a state that
lasted less than one check (reconnected at once) still gives its alert.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from amo_gateway.errors import ConfigError
from amo_gateway.settings import PREFIX, Settings
from amo_gateway.tokens import CONNECTED, Account, VaultData

REAUTH, EXPIRING, FAILING, BREAKER = "reauth_required", "long_lived_expiring", "refresh_failing", "breaker_open"
STAGES_DAYS = (14, 3, 1)
DAY = 86400.0


@dataclass(frozen=True)
class Kind:
    """How a kind of condition speaks: its start and end events, and whether reminders follow."""

    start: str
    end: str
    remind: bool
    new_episode_recovers: bool  # a new episode means the old one ended well in between (a reconnect)


KINDS = {
    REAUTH: Kind("reauth_required", "recovered", remind=True, new_episode_recovers=True),
    FAILING: Kind("refresh_failing", "recovered", remind=True, new_episode_recovers=True),
    EXPIRING: Kind("long_lived_expiring", "recovered", remind=False, new_episode_recovers=False),
    BREAKER: Kind("breaker_opened", "breaker_closed", remind=True, new_episode_recovers=False),
}


@dataclass(frozen=True)
class Condition:
    """One condition in force for one account."""

    kind: str
    account_id: str
    subdomain: str | None
    episode: str
    reason: str
    since: float

    @property
    def key(self) -> str:
        return f"{self.account_id}|{self.kind}"

    def record(self, last_sent: float) -> dict[str, Any]:
        """The outbox's `active` entry: plain JSON, no secret."""
        return {"kind": self.kind, "account_id": self.account_id, "subdomain": self.subdomain,
                "episode": self.episode, "reason": self.reason, "since": self.since,
                "last_sent": last_sent, "seen_at": last_sent}

    @classmethod
    def from_record(cls, raw: Mapping[str, Any]) -> Condition:
        return cls(raw["kind"], raw["account_id"], raw.get("subdomain"), raw["episode"], raw["reason"],
                   float(raw["since"]))


def check_settings(settings: Settings) -> None:
    """Alert targets must be complete: a webhook needs its secret, a Telegram bot its chat."""
    if settings.alert_webhook_url and not settings.secret("alert_webhook_secret"):
        raise ConfigError("missing setting: AMO_ALERT_WEBHOOK_SECRET (or the systemd credential "
                          "alert-webhook-secret): AMO_ALERT_WEBHOOK_URL is set, and alerts are always signed")
    if settings.secret("alert_telegram_bot_token") and not settings.alert_telegram_chat_id:
        raise ConfigError("missing setting: AMO_ALERT_TELEGRAM_CHAT_ID (AMO_ALERT_TELEGRAM_BOT_TOKEN is set)")


def reason_code(reason: str | None) -> str:
    """`refresh_answer_lost: a refresh was sent...` -> `refresh_answer_lost`."""
    return (reason or "").split(":", 1)[0].strip() or "unknown"


def vault_conditions(data: VaultData, now: float, transient_after: float) -> dict[str, Condition]:
    """Every condition the vault shows at `now` (the same in every process reading this vault)."""
    found: dict[str, Condition] = {}
    for account in data.accounts.values():
        for condition in _account_conditions(account, now, transient_after):
            found[condition.key] = condition
    return found


def _account_conditions(account: Account, now: float, transient_after: float) -> Iterable[Condition]:
    """One account's conditions; its episode is its `connected_at` (a reconnect starts a new one)."""
    pair, episode = account.tokens, str(account.connected_at)
    if pair is None:
        return

    def make(kind: str, reason: str, since: float, ep: str = episode) -> Condition:
        return Condition(kind, account.account_id, account.subdomain, ep, reason, since)

    if account.status != CONNECTED:
        yield make(REAUTH, account.reason or "refresh_rejected", now)
    elif account.long_lived and pair.expires_at <= now:
        yield make(REAUTH, "long_lived_expired: the long-lived token has expired", pair.expires_at)
    elif account.long_lived and pair.expires_at - now < STAGES_DAYS[0] * DAY:
        stage = min(d for d in STAGES_DAYS if pair.expires_at - now < d * DAY)
        left = (pair.expires_at - now) / DAY
        yield make(EXPIRING, f"long_lived_expiring: the long-lived token expires in {left:.1f} days "
                             f"(stage {stage} d)", now, f"{episode}|{stage}")
    failing = account.failing_since
    if account.status == CONNECTED and failing is not None and now - failing >= transient_after:
        yield make(FAILING, f"refresh_failing: refreshes have failed since {iso(failing)}: "
                            f"{account.last_error or 'no answer'}", failing, str(failing))


@dataclass(frozen=True)
class Event:
    """Something this process saw happen: a condition began (`condition`) or a breaker closed (`closed`)."""

    condition: Condition | None = None
    closed: str | None = None  # the key of a breaker condition that this process saw close


@dataclass(frozen=True)
class Policy:
    """The timing of reminders and of forgetting a breaker no process asserts any more."""

    reminder_interval: float
    breaker_stale_after: float


def reconcile(active: dict[str, dict[str, Any]], events: Iterable[Event], vault: Mapping[str, Condition],
              local: Mapping[str, Condition], now: float, policy: Policy, healthy: Callable[[str], bool]
              ) -> list[tuple[str, Condition, bool]]:
    """Update `active` in place; return the alerts to send as (event name, condition, is a reminder)."""
    out: list[tuple[str, Condition, bool]] = []
    for event in events:
        if event.condition is not None:
            _begin(active, event.condition, now, out)
        elif event.closed is not None and event.closed in active:
            out.append((KINDS[BREAKER].end, Condition.from_record(active.pop(event.closed)), False))
    for condition in [*vault.values(), *local.values()]:
        _begin(active, condition, now, out)
        if condition.kind == BREAKER:
            active[condition.key]["seen_at"] = now
    _end_gone(active, vault, now, policy, healthy, out)
    _remind(active, now, policy, out)
    return out


def _begin(active: dict[str, dict[str, Any]], condition: Condition, now: float,
           out: list[tuple[str, Condition, bool]]) -> None:
    """A condition seen now: alert when it is new or a new episode of it; the same one again stays quiet."""
    known = active.get(condition.key)
    if known is not None and known["episode"] == condition.episode:
        return
    kind = KINDS[condition.kind]
    if known is not None and kind.new_episode_recovers:
        out.append((kind.end, Condition.from_record(known), False))
    active[condition.key] = condition.record(now)
    out.append((kind.start, condition, False))


def _end_gone(active: dict[str, dict[str, Any]], vault: Mapping[str, Condition], now: float, policy: Policy,
              healthy: Callable[[str], bool], out: list[tuple[str, Condition, bool]]) -> None:
    """Conditions no longer true end: `recovered` once per healthy account, `breaker_closed` when stale."""
    recovered: set[str] = set()
    for key, raw in list(active.items()):
        condition = Condition.from_record(raw)
        if condition.kind == BREAKER:
            if now - float(raw.get("seen_at", 0.0)) > policy.breaker_stale_after:
                del active[key]
                out.append((KINDS[BREAKER].end, replace(condition, reason="breaker_closed: no gateway process "
                            "holds it open any more"), False))
            continue
        if key in vault:
            continue
        del active[key]
        if healthy(condition.account_id) and condition.account_id not in recovered:
            recovered.add(condition.account_id)
            out.append((KINDS[condition.kind].end, condition, False))


def _remind(active: dict[str, dict[str, Any]], now: float, policy: Policy,
            out: list[tuple[str, Condition, bool]]) -> None:
    for raw in active.values():
        if KINDS[raw["kind"]].remind and now - float(raw["last_sent"]) >= policy.reminder_interval:
            raw["last_sent"] = now
            out.append((KINDS[raw["kind"]].start, Condition.from_record(raw), True))


def healthy_in(data: VaultData, now: float) -> Callable[[str], bool]:
    """Whether an account is connected and usable in this vault (a `recovered` alert needs it)."""
    def healthy(account_id: str) -> bool:
        account = data.accounts.get(account_id)
        return (account is not None and account.status == CONNECTED and account.tokens is not None
                and not (account.long_lived and account.tokens.expires_at <= now))
    return healthy


def payload(name: str, condition: Condition, reminder: bool, now: float, reconnect_url: str | None
            ) -> dict[str, Any]:
    """The alert body: event, account_id, subdomain, reason, at, reconnect, and a few helpful extras."""
    ending = name in ("recovered", "breaker_closed")
    return {
        "id": secrets.token_hex(12),  # receivers drop a redelivery (after a crash mid-delivery) by it
        "event": name, "account_id": condition.account_id, "subdomain": condition.subdomain,
        "reason": _reason(name, condition.reason),
        "reason_code": name if ending else reason_code(condition.reason),
        "at": iso(now), "since": iso(condition.since), "reminder": reminder,
        "reconnect": reconnect_hint(name, condition, reconnect_url),
    }


def _reason(name: str, reason: str) -> str:
    if name == "recovered":
        return "recovered: connected again"
    if name == "breaker_closed" and not reason.startswith("breaker_closed"):
        return "breaker_closed: amoCRM answers this account again"
    return reason


def reconnect_hint(name: str, condition: Condition, url: str | None) -> str:
    """What a human does about it, in one or two sentences."""
    code = reason_code(condition.reason)
    if name in ("recovered", "breaker_closed"):
        return "Nothing to do."
    if name == "breaker_opened":
        text = ("amoCRM answers 403 for this account (a ban for too many requests, or revoked rights): check the "
                "integration in amoCRM or ask its support; the gateway probes again after AMO_BREAKER_COOLDOWN.")
    elif name == "refresh_failing":
        text = ("The gateway keeps retrying; check that it can reach amoCRM (network, DNS, amoCRM's status). "
                "Reconnect only if this turns into reauth_required.")
    elif name == "long_lived_expiring" or code == "long_lived_expired":
        text = ("Create a new long-lived token in amoCRM and import it (`amo-gateway import-token FILE`, as the "
                "service's user), or connect the account with OAuth.")
    else:
        text = (f"Reconnect the account: run the API-key exchange (POST {PREFIX}/exchange-api-key with the "
                "operator token) or open the consent page from `amo-gateway-ctl authorize-url`.")
    return f"{text} Console: {url}" if url else text


def iso(moment: float) -> str:
    """UTC, ISO 8601, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
