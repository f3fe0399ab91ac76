"""Alerts (alerts.py, alerting.py, outbox.py, webhook.py) against a local receiver on 127.0.0.1.

The receiver refuses its first deliveries on demand, checks signatures with the README's own five lines,
and fakes Telegram's sendMessage. The crash test runs the real gateway process and SIGKILLs it while the
alert waits in the outbox.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from amo_gateway.alerting import AlertService
from amo_gateway.backends import open_outbox, open_store
from amo_gateway.errors import ConfigError
from amo_gateway.metrics import Metrics
from amo_gateway.outbox import HISTORY_MAX, OutboxData, outbox_path
from amo_gateway.settings import load_settings
from amo_gateway.tokens import Account, TokenPair
from amo_gateway.typedefs import ALERTS, REFRESHER, STORE
from amo_gateway.webhook import SIGNATURE_HEADER, sign, verify
from tests.conftest import ACCOUNT_ID, API_KEY, LOGIN, FakeClock, Rig, RigFactory

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = str(ACCOUNT_ID)
LIFETIME = 3600
DAY = 86400.0
REQUIRED = {"event", "account_id", "subdomain", "reason", "at", "reconnect"}


def readme_verify() -> Callable[[bytes, str, bytes], bool]:
    """The receiver's verification, exactly as the README's "Verifying an alert" section prints it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Verifying an alert", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    lines = code.group(1).strip().splitlines()
    assert len(lines) == 5, lines  # the five lines the issue promises
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)  # noqa: S102 - the README's own text, the point of the test
    return namespace["verify"]  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """A webhook receiver and a fake Telegram; `refuse` answers 500 to that many deliveries first."""

    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    bot_token: str = field(default_factory=lambda: f"{secrets.randbelow(10**9)}:{secrets.token_urlsafe(24)}")
    refuse: int = 0
    attempts: int = 0
    accepted: list[dict[str, Any]] = field(default_factory=list)
    telegram: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    url: str = ""

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        if self.refuse > 0:
            self.refuse -= 1
            return web.json_response({"error": "not now"}, status=500)
        if not readme_verify()(self.secret.encode(), request.headers[SIGNATURE_HEADER], body):
            self.bad_signatures += 1
            return web.json_response({"error": "bad signature"}, status=401)
        self.accepted.append({"body": json.loads(body), "raw": body,
                              "signature": request.headers[SIGNATURE_HEADER]})
        return web.json_response({"ok": True})

    async def send_message(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.bot_token:
            return web.json_response({"ok": False}, status=401)
        self.telegram.append(await request.json())
        return web.json_response({"ok": True, "result": {}})

    def events(self) -> list[str]:
        return [a["body"]["event"] for a in self.accepted]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.hook)
    app.router.add_post("/bot{token}/sendMessage", rec.send_message)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    rec.url = f"http://127.0.0.1:{server.port}"
    yield rec
    await server.close()


@pytest.fixture(params=["file", "postgres"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The rig's state, outbox and audit trail: beside the vault file, or in a fresh PostgreSQL database."""
    return {} if request.param == "file" else {"database_url": request.getfixturevalue("database_url")}


async def alert_rig(make_rig: RigFactory, receiver: Receiver, backend: dict[str, Any] | None = None,
                    **extra: Any) -> tuple[Rig, FakeClock]:
    clock = FakeClock()
    extra.update(backend or {})
    rig = await make_rig(clock=clock, run_refresher=False, refresh_margin=600, sandbox_access_ttl=LIFETIME,
                         alert_webhook_url=f"{receiver.url}/hook", alert_webhook_secret=receiver.secret, **extra)
    await rig.connect()
    return rig, clock


def service(rig: Rig) -> AlertService:
    return rig.app[ALERTS]


async def reconnect(rig: Rig) -> None:
    """The human's fix: a new exchange, and amoCRM's new callback answered (not the first one again)."""
    before = len(rig.sandbox.callbacks)
    resp = await rig.client.post(rig.url("/exchange-api-key"), json={"login": LOGIN, "api_key": API_KEY},
                                 headers=rig.admin)
    assert resp.status == 202, await resp.text()
    for _ in range(250):
        if any(c["status"] is not None for c in rig.sandbox.callbacks[before:]):
            assert (await rig.app[STORE].snapshot(recheck=True)).accounts[ACCOUNT].status == "connected"
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the reconnect's callback was never answered")


def stored_subdomain(rig: Rig) -> str | None:
    return rig.vault().read()[0].accounts[ACCOUNT].subdomain


async def revoke_and_refresh(rig: Rig, clock: FakeClock) -> None:
    """amoCRM revokes the pair; the next due refresh learns it (reauth_required: token_revoked)."""
    rig.sandbox.revoke(ACCOUNT_ID, access=False)
    clock.advance(LIFETIME - 590)
    outcomes = await rig.app[REFRESHER].tick()
    assert [o.result for o in outcomes] == ["reauth"]


async def test_one_state_change_gives_one_signed_alert_then_reminders_then_recovered(
        make_rig: RigFactory, receiver: Receiver, backend: dict[str, Any]) -> None:
    """A revocation alerts once however often it is checked; 12 h later a reminder; a reconnect: recovered."""
    rig, clock = await alert_rig(make_rig, receiver, backend)
    assert await service(rig).check() == []  # connected: nothing to say
    await revoke_and_refresh(rig, clock)
    for _ in range(3):
        await service(rig).check()
        await service(rig).deliver()
    assert receiver.events() == ["reauth_required"]
    alert = receiver.accepted[0]["body"]
    assert REQUIRED <= set(alert)
    assert (alert["account_id"], alert["reason_code"]) == (ACCOUNT, "token_revoked")
    assert alert["subdomain"] == stored_subdomain(rig)
    assert alert["reason"].startswith("token_revoked") and "exchange-api-key" in alert["reconnect"]
    assert alert["reminder"] is False and alert["at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.now))
    assert receiver.bad_signatures == 0
    clock.advance(6 * 3600)
    await service(rig).check()
    assert await service(rig).deliver() == 0  # still the same state, no reminder yet
    clock.advance(6 * 3600)
    await service(rig).check()
    await service(rig).deliver()
    assert receiver.events() == ["reauth_required", "reauth_required"]
    assert receiver.accepted[1]["body"]["reminder"] is True
    await reconnect(rig)
    await service(rig).check()
    await service(rig).deliver()
    assert receiver.events() == ["reauth_required", "reauth_required", "recovered"]
    assert receiver.accepted[2]["body"]["reconnect"] == "Nothing to do."


async def test_a_reauth_fixed_before_the_next_check_still_alerts_once(make_rig: RigFactory,
                                                                      receiver: Receiver,
                                                                      backend: dict[str, Any]) -> None:
    """The refresh outcome is an event: reconnected before any check, the alert and the recovery both go."""
    rig, clock = await alert_rig(make_rig, receiver, backend)
    await revoke_and_refresh(rig, clock)
    await reconnect(rig)  # fixed before the alert service looked at the vault
    await service(rig).check()
    await service(rig).check()
    await service(rig).deliver()
    assert receiver.events() == ["reauth_required", "recovered"]


async def test_processes_sharing_a_vault_raise_one_alert(make_rig: RigFactory, receiver: Receiver,
                                                         backend: dict[str, Any]) -> None:
    """A second process's (replica's) alert service on the same state and outbox sees the alert already raised,
    and when both deliver at once the receiver gets it once."""
    rig, clock = await alert_rig(make_rig, receiver, backend)
    await revoke_and_refresh(rig, clock)
    store = open_store(rig.settings, rig.keys, None)
    await store.open()
    other = AlertService(rig.settings, store, open_outbox(rig.settings, store), service(rig).targets, clock,
                         Metrics(), service(rig).session)
    raised = [*await other.check(), *await service(rig).check(), *await other.check()]
    assert [a["event"] for a in raised] == ["reauth_required"]
    assert sorted(await asyncio.gather(other.deliver(), service(rig).deliver())) == [0, 1]
    assert receiver.events() == ["reauth_required"]
    assert [h["targets"] for h in await other.history(ACCOUNT)] == [{"webhook": "delivered"}]
    await store.close()


async def test_delivery_retries_with_backoff_in_order_and_counts_in_metrics(make_rig: RigFactory,
                                                                            receiver: Receiver,
                                                                            backend: dict[str, Any]) -> None:
    """Refused deliveries wait a growing backoff and keep their order; /metrics shows failed, delivered, pending."""
    rig, clock = await alert_rig(make_rig, receiver, backend, alert_retry_max=100)
    receiver.refuse = 3
    await revoke_and_refresh(rig, clock)
    await service(rig).check()
    await reconnect(rig)
    await service(rig).check()  # reauth_required, then recovered, both queued
    assert await service(rig).deliver() == 0
    assert await service(rig).deliver() == 0  # waiting out its backoff: no second attempt yet
    assert receiver.attempts == 1
    metrics = await (await rig.client.get("/metrics")).text()
    assert 'amo_gateway_alert_deliveries_total{result="failed",target="webhook"} 1.0' in metrics
    assert "amo_gateway_alerts_pending 2.0" in metrics
    for _ in range(3):
        clock.advance(100 + 1)
        await service(rig).deliver()
    assert receiver.attempts == 5 and receiver.events() == ["reauth_required", "recovered"]
    metrics = await (await rig.client.get("/metrics")).text()
    assert 'amo_gateway_alert_deliveries_total{result="delivered",target="webhook"} 2.0' in metrics
    assert "amo_gateway_alerts_pending 0.0" in metrics
    history = await service(rig).history(ACCOUNT)
    assert [h["event"] for h in history] == ["recovered", "reauth_required"]  # newest first
    assert all(h["targets"] == {"webhook": "delivered"} for h in history)


async def test_refresh_failing_past_the_threshold_alerts_once_then_recovered(make_rig: RigFactory,
                                                                             receiver: Receiver,
                                                                             backend: dict[str, Any]) -> None:
    """Transient failures alert only once they outlast AMO_ALERT_TRANSIENT_AFTER; a success is `recovered`."""
    rig, clock = await alert_rig(make_rig, receiver, backend, alert_transient_after=900)
    rig.sandbox.fail_next["token"] = [503] * 20
    clock.advance(LIFETIME - 590)
    assert [o.result for o in await rig.app[REFRESHER].tick()] == ["transient"]
    await service(rig).check()
    clock.advance(600)
    await rig.app[REFRESHER].tick()
    await service(rig).check()
    assert receiver.events() == [] and await service(rig).deliver() == 0  # 600 s of failing: not yet
    clock.advance(400)
    await rig.app[REFRESHER].tick()
    await service(rig).check()
    await service(rig).check()
    await service(rig).deliver()
    assert receiver.events() == ["refresh_failing"]
    assert receiver.accepted[0]["body"]["reason_code"] == "refresh_failing"
    rig.sandbox.fail_next["token"] = []
    clock.advance(400)
    assert [o.result for o in await rig.app[REFRESHER].tick()] == ["refreshed"]
    await service(rig).check()
    await service(rig).deliver()
    assert receiver.events() == ["refresh_failing", "recovered"]


async def test_long_lived_token_alerts_at_14_3_and_1_days_then_expired(make_rig: RigFactory,
                                                                      receiver: Receiver,
                                                                      backend: dict[str, Any]) -> None:
    """Each expiry stage alerts once; past expiry the account needs re-authorization (long_lived_expired)."""
    rig, clock = await alert_rig(make_rig, receiver, backend)
    pair = TokenPair("long-lived-access", None, clock.now + 20 * DAY, clock.now)
    lived = Account(ACCOUNT, rig.sandbox_url, pair, long_lived=True, subdomain="demo", connected_at=clock.now)
    await rig.app[STORE].put_account(lived)
    stages = [(5 * DAY, []), (2 * DAY, ["long_lived_expiring"]), (3 * DAY, []), (8 * DAY, ["long_lived_expiring"]),
              (1.5 * DAY, ["long_lived_expiring"]), (0.4 * DAY, []), (0.2 * DAY, ["reauth_required"])]
    for step, expected in stages:
        clock.advance(step)
        raised = [*await service(rig).check(), *await service(rig).check()]
        assert [a["event"] for a in raised] == expected, (step, raised)
    await service(rig).deliver()
    days = [a["body"]["reason"] for a in receiver.accepted]
    assert "stage 14 d" in days[0] and "stage 3 d" in days[1] and "stage 1 d" in days[2]
    assert receiver.accepted[3]["body"]["reason_code"] == "long_lived_expired"
    assert "import-token" in receiver.accepted[3]["body"]["reconnect"]


async def test_breaker_opened_and_closed_each_alert_once(make_rig: RigFactory, receiver: Receiver,
        backend: dict[str, Any]) -> None:
    """amoCRM's ban opens the proxy's breaker (one alert however many callers); its end closes it (one alert)."""
    rig, _ = await alert_rig(make_rig, receiver, backend, breaker_cooldown=0.2)
    rig.sandbox.banned.add(ACCOUNT_ID)
    for _ in range(3):
        resp = await rig.client.get(rig.url("/proxy/api/v4/account"), headers=rig.admin)
        assert resp.status in (403, 503)
        await service(rig).check(force=False)
    rig.sandbox.banned.clear()
    await asyncio.sleep(0.3)
    resp = await rig.client.get(rig.url("/proxy/api/v4/account"), headers=rig.admin)
    assert resp.status == 200
    await service(rig).check(force=False)
    await service(rig).check()
    await service(rig).deliver()
    assert receiver.events() == ["breaker_opened", "breaker_closed"]
    assert [a["body"]["reason_code"] for a in receiver.accepted] == ["breaker_opened", "breaker_closed"]
    assert receiver.accepted[0]["body"]["subdomain"] == stored_subdomain(rig)


async def test_telegram_gets_the_alert_and_its_bot_token_reaches_no_log(make_rig: RigFactory, receiver: Receiver,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """sendMessage to the chat, through the configured API base URL; the bot token is never logged."""
    caplog.set_level("DEBUG")
    rig, clock = await alert_rig(make_rig, receiver, alert_telegram_bot_token=receiver.bot_token,
                                 alert_telegram_chat_id="-100123", alert_telegram_api_url=receiver.url)
    await revoke_and_refresh(rig, clock)
    await service(rig).check()
    receiver.bot_token = "another-bot"  # the fake now refuses: the failure is logged without the URL
    await service(rig).deliver()
    receiver.bot_token = rig.settings.secret("alert_telegram_bot_token") or ""
    clock.advance(700)
    await service(rig).deliver()
    assert len(receiver.telegram) == 1 and receiver.events() == ["reauth_required"]
    sent = receiver.telegram[0]
    assert sent["chat_id"] == "-100123"
    assert "reauth_required" in sent["text"] and "token_revoked" in sent["text"] and ACCOUNT in sent["text"]
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records
                       if r.name.startswith("amo_gateway"))  # the fake's own access log shows its path
    assert "alert.delivery_failed" in logged and "alert.delivered" in logged
    assert receiver.bot_token not in logged and receiver.bot_token.split(":")[1] not in logged
    assert receiver.secret not in logged


def test_signature_is_hmac_of_time_dot_body_and_the_readme_lines_verify_it() -> None:
    """The header format; the README's receiver accepts it and refuses a changed body or another secret."""
    body, secret, now = b'{"event":"recovered"}', "s3cret-for-test", int(time.time())
    header = sign(secret, body, now)
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header)
    check = readme_verify()
    assert check(secret.encode(), header, body)
    assert not check(secret.encode(), header, body.replace(b"recovered", b"reauth_required"))
    assert not check(b"another", header, body)
    assert not check(secret.encode(), sign(secret, body, now - 3600), body)  # replayed an hour later
    assert verify(secret, header, body, now) and not verify(secret, header, body + b" ", now)


def test_the_outbox_is_bounded_dropping_the_oldest_and_counting() -> None:
    """Past AMO_ALERT_OUTBOX_MAX the oldest undelivered alert goes; history is capped too."""
    box = OutboxData()
    for n in range(HISTORY_MAX + 5):
        box.enqueue({"id": f"a{n}", "event": "recovered", "account_id": "1"}, ["webhook"], float(n), 3)
    assert [e["id"] for e in box.pending] == [f"a{HISTORY_MAX + 2}", f"a{HISTORY_MAX + 3}", f"a{HISTORY_MAX + 4}"]
    assert box.dropped == HISTORY_MAX + 2 and len(box.history) == HISTORY_MAX
    assert box.history[-4]["targets"] == {"webhook": "dropped"}
    box.forget_targets({"telegram"})  # the webhook is no longer configured: nothing waits for it
    assert box.pending == [] and box.history[-1]["targets"] == {"webhook": "dropped"}


def test_alert_settings_come_from_credentials_and_never_from_config_yaml(tmp_path: Path) -> None:
    """The two secrets are systemd credentials or environment; config.yaml holding one stops start-up."""
    (tmp_path / "alert-webhook-secret").write_text("hook-secret\n")
    (tmp_path / "alert-telegram-bot-token").write_text("123:bot-token\n")
    settings = load_settings(None, environ={"CREDENTIALS_DIRECTORY": str(tmp_path),
                                            "AMO_ALERT_WEBHOOK_URL": "https://hooks.example.com/amo"})
    assert settings.secret("alert_webhook_secret") == "hook-secret"
    assert settings.secret("alert_telegram_bot_token") == "123:bot-token"
    assert "hook-secret" not in repr(settings) and "bot-token" not in repr(settings)
    (tmp_path / "alert-webhook-secret").write_text("")  # the shipped unit's empty files: no alerts at all
    (tmp_path / "alert-telegram-bot-token").write_text("")
    assert not load_settings(None, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}).alerts_enabled
    config = tmp_path / "config.yaml"
    config.write_text("alert_webhook_secret: hook-secret\n")
    with pytest.raises(ConfigError, match="alert-webhook-secret"):
        load_settings(config, environ={})


async def test_an_unreadable_outbox_is_set_aside_and_the_gateway_still_starts(
        make_rig: RigFactory, receiver: Receiver, tmp_path: Path) -> None:
    """Alerts never stop the gateway: a mangled outbox is kept as `.corrupt` and a new one begins."""
    box = outbox_path(tmp_path / "vault" / "vault.enc")
    box.parent.mkdir(mode=0o700)
    box.write_text("{not json")
    rig, clock = await alert_rig(make_rig, receiver)
    assert box.with_name(box.name + ".corrupt").read_text() == "{not json"
    await revoke_and_refresh(rig, clock)
    await service(rig).check()
    await service(rig).deliver()
    assert receiver.events() == ["reauth_required"]


async def test_a_webhook_without_its_secret_stops_start_up(make_rig: RigFactory) -> None:
    """Alerts are always signed: a URL without a secret is refused, naming the setting."""
    with pytest.raises(ConfigError, match="AMO_ALERT_WEBHOOK_SECRET"):
        await make_rig(alert_webhook_url="http://127.0.0.1:9/hook")


# The real process: SIGKILL while the alert waits in the outbox.
sys.path.insert(0, str(ROOT / "scripts"))
from _harness import Harness, poll  # noqa: E402 - the scripts directory is not a package


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the harness's start-up polls
async def test_an_alert_survives_sigkill_and_arrives_once_signed_after_the_restart(
        tmp_path: Path, receiver: Receiver) -> None:
    """Revoked pair -> alert refused by the receiver -> kill -9 -> restart: delivered exactly once, signed."""
    receiver.refuse = 10**6
    env = {"AMO_ALERT_WEBHOOK_URL": f"{receiver.url}/hook", "AMO_ALERT_WEBHOOK_SECRET": receiver.secret,
           "AMO_ALERT_CHECK_INTERVAL": "1", "AMO_ALERT_RETRY_MAX": "1", "AMO_LOG_LEVEL": "INFO"}
    async with Harness(tmp_path / "h", access_ttl=3, extra_env=env) as h:
        await h.start()
        await h.connect()
        await h.post_sandbox("/_sandbox/revoke", {"access": False})
        assert await poll(lambda: _attempts_at_least(receiver, 2), 15, interval=0.1)  # refused, retried
        pending = json.loads(outbox_path(h.vault_path).read_text())["pending"]
        assert [p["payload"]["event"] for p in pending] == ["reauth_required"]
        await h.kill()
        receiver.refuse = 0
        await h.start()
        assert await poll(lambda: _accepted(receiver), 15, interval=0.1)
        await h.connect()  # the human fixes it: one `recovered`
        assert await poll(lambda: _accepted(receiver, 2), 15, interval=0.1)
        await asyncio.sleep(2.5)  # several delivery ticks: nothing is sent twice
        await h.stop()
        secrets_used = [h.client_secret, h.admin_token, receiver.secret, *_tokens(h)]
    assert receiver.events() == ["reauth_required", "recovered"]
    first = receiver.accepted[0]
    assert first["body"]["id"] == pending[0]["id"] and first["body"]["reason_code"] == "token_revoked"
    assert receiver.bad_signatures == 0
    log_text = "".join(p.read_text() for p in (tmp_path / "h").glob("gateway-*.log"))
    assert "alert.raised" in log_text and "alert.delivery_failed" in log_text
    for value in secrets_used:
        assert value not in log_text
        assert all(value not in a["raw"].decode() for a in receiver.accepted)


async def _attempts_at_least(receiver: Receiver, n: int) -> bool:
    return receiver.attempts >= n


async def _accepted(receiver: Receiver, n: int = 1) -> bool:
    return len(receiver.accepted) >= n


def _tokens(h: Harness) -> list[str]:
    account = h.read_vault().accounts[ACCOUNT]
    assert account.tokens is not None
    return [t for t in (account.tokens.access_token, account.tokens.refresh_token) if t]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the harness's start-up polls
async def test_two_gateway_processes_on_one_vault_send_each_alert_once(tmp_path: Path, receiver: Receiver) -> None:
    """Two real processes share the vault and the outbox: one reauth_required, one recovered, each delivered once."""
    env = {"AMO_ALERT_WEBHOOK_URL": f"{receiver.url}/hook", "AMO_ALERT_WEBHOOK_SECRET": receiver.secret,
           "AMO_ALERT_CHECK_INTERVAL": "0.5"}
    async with Harness(tmp_path / "h", access_ttl=3, gateways=2, extra_env=env) as h:
        await h.start(0)
        await h.start(1)
        await h.connect()
        await h.post_sandbox("/_sandbox/revoke", {"access": False})
        assert await poll(lambda: _accepted(receiver), 15, interval=0.1)
        await asyncio.sleep(2.5)  # both processes have looked at the vault (ticks of 1 s) before the human acts
        await h.connect(1)
        assert await poll(lambda: _accepted(receiver, 2), 15, interval=0.1)
        await asyncio.sleep(3)  # six checks of each process: neither raises or sends anything again
    assert receiver.events() == ["reauth_required", "recovered"] and receiver.attempts == 2
