"""The audit trail: append-only JSON lines, 0600, the events that matter, and never a raw secret.

The behaviour tests run on both backends (`file`: audit.log beside the vault; `postgres`: the amo_audit table);
the rotation tests are about the file's own rotation (the table's retention is in tests/test_audit_contract.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from amo_gateway import cli
from amo_gateway.audit import FIELD_LIMIT, audit_path
from amo_gateway.audit_file import Rotation, append_lines, read_lines
from amo_gateway.typedefs import AUDIT, MANAGER
from tests.conftest import ACCOUNT_ID, API_KEY, Rig, RigFactory
from tests.test_pg_gateway import _second_gateway

CONSUMER = {"Authorization": "Bearer consumer-secret-1"}


@pytest.fixture(params=["file", "postgres"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Where the rig keeps its state and trail: beside the vault file, or in a fresh PostgreSQL database."""
    return {} if request.param == "file" else {"database_url": request.getfixturevalue("database_url")}


async def _stored(rig: Rig) -> list[str]:
    """The trail's lines as stored, wherever it is."""
    await rig.app[AUDIT].flush()
    sink = rig.app[AUDIT].sink
    assert sink is not None
    return await sink.tail(None)


async def _lines(rig: Rig) -> list[dict[str, object]]:
    return [json.loads(line) for line in await _stored(rig)]


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


async def test_trail_records_each_security_event_once_with_consumer_names(make_rig: RigFactory,
                                                                         backend: dict[str, Any]) -> None:
    """Exchange, callback accepted/refused with why, refresh, token handed out (once per token), disconnect."""
    rig = await make_rig(run_refresher=False, **backend)
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


async def test_trail_holds_no_raw_secret_and_is_private(make_rig: RigFactory, backend: dict[str, Any]) -> None:
    """Scan the trail for every token, code, key and secret the story used: none appears; a file is 0600."""
    rig = await make_rig(run_refresher=False, **backend)
    secrets = await _story(rig)
    text = "\n".join(await _stored(rig))
    path = audit_path(rig.settings.vault_path)
    if backend:
        assert not path.exists() and "callback.accepted" in text  # in the database, not beside the vault
    else:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for secret in secrets:
        assert secret and secret not in text
    issued = next(line for line in await _lines(rig) if line["event"] == "token.issued")
    assert issued["access_token_hmac"] in {rig.app[AUDIT].digest(s) for s in secrets}


async def test_cli_audit_shows_the_tail_as_json_or_for_people(make_rig: RigFactory, backend: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`amo-gateway audit --tail 2 --json` prints the last two stored lines; without --json, readable rows."""
    rig = await make_rig(run_refresher=False, **backend)
    await rig.connect()
    await rig.client.get(rig.url("/token"), headers=CONSUMER)
    stored = await _stored(rig)
    monkeypatch.setenv("AMO_VAULT_PATH", str(rig.settings.vault_path))
    if backend:
        monkeypatch.setenv("AMO_DATABASE_URL", backend["database_url"])
    assert await asyncio.to_thread(cli.main, ["audit", "--tail", "2", "--json"]) == 0
    assert capsys.readouterr().out.splitlines() == stored[-2:]
    assert await asyncio.to_thread(cli.main, ["audit"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == len(stored) and "token.issued" in rows[-1] and "consumer=crm-sync" in rows[-1]


def _disconnect_params(account: str) -> dict[str, str]:
    return {"account_id": account, "client_uuid": "not-ours", "signature": "0" * 64}


def _trail_bytes(rig: Rig) -> int:
    path = audit_path(rig.settings.vault_path)
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


async def _stored_bytes(rig: Rig) -> int:
    """The trail's size as the file counts it (each line and its newline), wherever it is."""
    return sum(len(line.encode()) + 1 for line in await _stored(rig))


async def test_300_refused_2kb_disconnects_grow_the_trail_by_less_than_200kb(make_rig: RigFactory,
                                                                            backend: dict[str, Any]) -> None:
    """The issue's bar: long caller values are cut and repeated refusals merged into one counted line."""
    rig = await make_rig(run_refresher=False, **backend)
    await rig.connect()
    before = await _stored_bytes(rig)
    if not backend:
        assert before == _trail_bytes(rig)  # the measure is the file's own size
    for number in range(300):
        resp = await rig.client.get(rig.url("/disconnect"), params=_disconnect_params(f"{number:04d}" + "x" * 2040))
        assert resp.status == 403
    lines = await _lines(rig)
    assert await _stored_bytes(rig) - before < 200_000
    refused = [line for line in lines if line["event"] == "disconnect.refused"]
    assert len(refused) == 2  # the first in full (its account cut), then one line counting the other 299
    assert len(str(refused[0]["account"])) < FIELD_LIMIT + 32 and "2044 chars" in str(refused[0]["account"])
    assert refused[1]["repeated"] == 299 and refused[1]["reason"] == "invalid_signature"


async def test_merged_refusals_get_one_count_line_per_interval_without_waiting_for_more(
        make_rig: RigFactory, backend: dict[str, Any]) -> None:
    """Each interval writes its first refusal in full and, when it ends, one line with the count of the rest."""
    rig = await make_rig(run_refresher=False, audit_merge_seconds=1.0, **backend)
    for _ in range(2):
        for _ in range(5):
            await rig.client.get(rig.url("/callback"), params={"code": "c", "state": "forged"})
        await asyncio.sleep(1.5)  # the writer itself writes the count when the interval ends
    sink = rig.app[AUDIT].sink
    assert sink is not None
    refused = [json.loads(line) for line in await sink.tail(None) if "callback.refused" in line]
    assert [line.get("repeated") for line in refused] == [None, 4, None, 4]


async def test_the_trail_rotates_by_size_and_keeps_a_bounded_number_of_old_files(make_rig: RigFactory) -> None:
    """With merging off, 300 refusals roll the trail over; only AMO_AUDIT_BACKUPS old files stay."""
    rig = await make_rig(run_refresher=False, audit_merge_seconds=0, audit_max_bytes=8192, audit_backups=2)
    for number in range(300):
        await rig.client.get(rig.url("/disconnect"), params=_disconnect_params(f"acct-{number}"))
        if number % 50 == 0:
            await rig.app[AUDIT].flush()
    await rig.app[AUDIT].flush()
    path = audit_path(rig.settings.vault_path)
    assert sorted(p.name for p in path.parent.glob("audit.log*")) == ["audit.log", "audit.log.1", "audit.log.2"]
    assert _trail_bytes(rig) <= 3 * 8192 + 50 * 1024
    kept = read_lines(path)
    assert json.loads(kept[-1])["account"] == "acct-299"
    numbers = [int(json.loads(line)["account"].split("-")[1]) for line in kept]
    assert numbers == sorted(numbers)  # oldest file first, no gap inside what is kept
    assert numbers == list(range(numbers[0], 300))


def test_append_rotates_before_the_file_would_pass_its_limit(tmp_path: Path) -> None:
    """Blocking writer: each file stays under max_bytes; the oldest beyond the backups is dropped."""
    path = tmp_path / "audit.log"
    for number in range(100):
        append_lines(path, [json.dumps({"n": number, "pad": "p" * 80})], Rotation(max_bytes=1000, backups=3))
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    assert all(f.stat().st_size <= 1000 for f in files)
    assert [json.loads(line)["n"] for line in read_lines(path)][-1] == 99


async def test_a_replica_reads_the_trail_another_replica_wrote(make_rig: RigFactory, database_url: str,
                                                               aiohttp_client: Any) -> None:
    """Two gateways on one database: what one audits (a token handed out, a refusal) the other's console reads."""
    rig = await make_rig(run_refresher=False, database_url=database_url)
    await rig.connect()
    other = await _second_gateway(rig, aiohttp_client)
    await rig.client.get(rig.url("/token"), headers=CONSUMER)
    await other.get(rig.url("/callback"), params={"code": "c", "state": "forged"})
    await rig.app[AUDIT].flush()
    seen = [json.loads(line)["event"] for line in await other.server.app[AUDIT].recent(50)]
    assert "token.issued" in seen and "callback.refused" in seen
    mine = [json.loads(line)["event"] for line in await rig.app[AUDIT].recent(50)]
    assert mine == seen  # one trail, one order, whichever replica reads it
