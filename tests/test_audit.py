"""The audit trail: append-only JSON lines, 0600, the events that matter, and never a raw secret."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import stat

import pytest

from amo_gateway import cli
from amo_gateway.audit import audit_path
from amo_gateway.typedefs import AUDIT, MANAGER
from tests.conftest import ACCOUNT_ID, API_KEY, Rig, RigFactory

CONSUMER = {"Authorization": "Bearer consumer-secret-1"}


async def _lines(rig: Rig) -> list[dict[str, object]]:
    await rig.app[AUDIT].flush()
    text = audit_path(rig.settings.vault_path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


async def _story(rig: Rig) -> list[str]:
    """Connect, hand out tokens, refresh, proxy, refuse a callback, disconnect; return every secret seen."""
    await rig.connect()
    secrets = [API_KEY, rig.settings.secret("client_secret") or "", "consumer-secret-1",
               rig.admin["Authorization"].split()[1]]
    secrets += [str(c["code"]) for c in rig.sandbox.callbacks]
    for _ in range(3):
        token = await (await rig.client.get(rig.url("/token"), headers=CONSUMER)).json()
        secrets.append(token["access_token"])
    data, _ = rig.vault().read()
    pair = data.accounts[str(ACCOUNT_ID)].tokens
    assert pair is not None and pair.refresh_token is not None
    secrets += [pair.access_token, pair.refresh_token]
    await rig.app[MANAGER].refresh(str(ACCOUNT_ID), seen=pair.access_token)
    data, _ = rig.vault().read()
    fresh = data.accounts[str(ACCOUNT_ID)].tokens
    assert fresh is not None and fresh.refresh_token is not None
    secrets += [fresh.access_token, fresh.refresh_token]
    await rig.client.get(rig.url("/callback?code=def50200forged&state=bogus-state"))
    secrets += ["def50200forged", "bogus-state"]
    sig = hmac.new(secrets[1].encode(), f"{rig.settings.client_id}|{ACCOUNT_ID}".encode(), hashlib.sha256)
    rig.sandbox.revoke(ACCOUNT_ID)  # the user removed the integration: amoCRM kills the tokens, then calls the hook
    await rig.client.get(rig.url(f"/disconnect?account_id={ACCOUNT_ID}&client_uuid={rig.settings.client_id}"
                                 f"&signature={sig.hexdigest()}"))
    return secrets


async def test_trail_records_each_security_event_once_with_consumer_names(make_rig: RigFactory) -> None:
    """Exchange, callback accepted/refused with why, refresh, token handed out (once per token), disconnect."""
    rig = await make_rig(run_refresher=False)
    await _story(rig)
    lines = await _lines(rig)
    events = [line["event"] for line in lines]
    for name in ("exchange.requested", "callback.accepted", "callback.refused", "refresh", "token.issued",
                 "disconnect.accepted"):
        assert name in events, name
    issued = [line for line in lines if line["event"] == "token.issued"]
    assert len(issued) == 1 and issued[0]["consumer"] == "crm-sync"
    refused = next(line for line in lines if line["event"] == "callback.refused")
    assert refused["reason"] == "invalid_state"
    refresh = next(line for line in lines if line["event"] == "refresh")
    assert refresh["outcome"] == "refreshed" and refresh["refresh_token_hmac"]


async def test_trail_holds_no_raw_secret_and_is_private(make_rig: RigFactory) -> None:
    """Scan the file for every token, code, key and secret the story used: none appears; mode is 0600."""
    rig = await make_rig(run_refresher=False)
    secrets = await _story(rig)
    await rig.app[AUDIT].flush()
    path = audit_path(rig.settings.vault_path)
    text = path.read_text(encoding="utf-8")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for secret in secrets:
        assert secret and secret not in text
    issued = next(line for line in await _lines(rig) if line["event"] == "token.issued")
    assert issued["access_token_hmac"] in {rig.app[AUDIT].digest(s) for s in secrets}


async def test_cli_audit_shows_the_tail_as_json_or_for_people(make_rig: RigFactory,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`amo-gateway audit --tail 2 --json` prints the last two stored lines; without --json, readable rows."""
    rig = await make_rig(run_refresher=False)
    await rig.connect()
    await rig.client.get(rig.url("/token"), headers=CONSUMER)
    stored = [json.dumps(line, ensure_ascii=False, separators=(",", ":")) for line in await _lines(rig)]
    monkeypatch.setenv("AMO_VAULT_PATH", str(rig.settings.vault_path))
    assert await asyncio.to_thread(cli.main, ["audit", "--tail", "2", "--json"]) == 0
    assert capsys.readouterr().out.splitlines() == stored[-2:]
    assert await asyncio.to_thread(cli.main, ["audit"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == len(stored) and "token.issued" in rows[-1] and "consumer=crm-sync" in rows[-1]
