"""What only the PostgreSQL backend has to prove: sealed rows, key rotation while running, migrations raced
by two replicas, migrate-state both ways, a connection lost mid-refresh, and a database that goes away."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet

from amo_gateway.backends.postgres import PgStore
from amo_gateway.errors import VaultUndecryptable
from amo_gateway.tokens import Account, PendingState, TokenPair, VaultData
from amo_gateway.typedefs import ALERTS, AUDIT, MANAGER, STORE
from amo_gateway.vault import KeyRing, Vault, load_keyring
from tests.conftest import ACCOUNT_ID, API_KEY, RigFactory
from tests.pg import ThrowawayPostgres, _bindir
from tests.test_pg_gateway import _second_gateway

ACCESS, REFRESH = "access-TOKEN-visible-if-leaked", "refresh-TOKEN-visible-if-leaked"


def _account(account_id: str = "7") -> Account:
    pair = TokenPair(ACCESS + account_id, REFRESH + account_id, 2e9, 1.7e9)
    return Account(account_id, "https://acme.amocrm.ru", subdomain="acme").with_pair(pair)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AMO_") and k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "amo_gateway", *args], capture_output=True, text=True,
                          env={**base, **env}, timeout=60, check=False)


async def _opened(url: str, keys: KeyRing, **kwargs: Any) -> PgStore:
    store = PgStore(url, keys, **kwargs)
    await store.open()
    return store


async def test_a_database_dump_holds_no_usable_secret(postgres: ThrowawayPostgres, database_url: str,
                                                      keys: KeyRing) -> None:
    store = await _opened(database_url, keys)
    await store.put_account(_account())
    await store.add_state("k" * 64, PendingState("exchange", 1.0, 3e9, "label-x", "login@example.com"), 1.0)
    await store.close()
    dump = (await asyncio.to_thread(subprocess.run, [str(postgres.bindir / "pg_dump"), database_url],
                                    capture_output=True, text=True, check=True)).stdout
    assert "amo_accounts" in dump and "\\x674141414141" in dump  # the rows are there, as Fernet tokens (bytea hex)
    for secret in (ACCESS, REFRESH, "login@example.com", "label-x", "acme.amocrm.ru"):
        assert secret not in dump and secret.encode().hex() not in dump


async def test_a_dump_with_alerts_and_audit_rows_holds_no_secret(postgres: ThrowawayPostgres, database_url: str,
                                                                  make_rig: RigFactory) -> None:
    """The outbox and trail tables hold alerts and audit lines, and still no token, code, key or secret in the
    clear: the trail names them by HMAC only, an alert never holds one (the webhook secret signs, off the row)."""
    rig = await make_rig(database_url=database_url, run_refresher=False, alert_webhook_url="http://127.0.0.1:9/hook",
                         alert_webhook_secret="webhook-SECRET-visible-if-leaked")
    await rig.connect()
    consumer = {"Authorization": "Bearer consumer-secret-1"}
    token = (await (await rig.client.get(rig.url("/token"), headers=consumer)).json())["access_token"]
    stored = (await rig.app[STORE].reload()).accounts[str(ACCOUNT_ID)].tokens
    assert stored is not None and stored.refresh_token is not None
    rig.sandbox.revoke(ACCOUNT_ID)
    await rig.app[MANAGER].refresh(str(ACCOUNT_ID), seen=stored.access_token)  # reauth_required: an alert
    raised = await rig.app[ALERTS].check()
    await rig.app[AUDIT].flush()
    dump = (await asyncio.to_thread(subprocess.run, [str(postgres.bindir / "pg_dump"), database_url],
                                    capture_output=True, text=True, check=True)).stdout
    assert "token.issued" in dump and "access_token_hmac" in dump  # the trail's rows are there
    assert [a["event"] for a in raised] == ["reauth_required"] and raised[0]["id"] in dump  # and the alert's
    secrets = [token, stored.access_token, stored.refresh_token, API_KEY, rig.settings.secret("client_secret") or "",
               "consumer-secret-1", rig.admin["Authorization"].split()[1], "webhook-SECRET-visible-if-leaked",
               *(str(c["code"]) for c in rig.sandbox.callbacks)]
    for secret in secrets:
        assert secret and secret not in dump and secret.encode().hex() not in dump


async def test_migrations_raced_by_two_replicas_apply_once(database_url: str, keys: KeyRing) -> None:
    stores = await asyncio.gather(*(_opened(database_url, keys) for _ in range(4)))
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT version, name FROM amo_schema_migrations").fetchall()
    assert sorted(rows) == [(1, "0001_state.sql"), (2, "0002_rate_sends.sql"), (3, "0003_idempotency.sql"),
                            (4, "0004_alerts_audit.sql"), (5, "0005_refresh_budget.sql")]
    for store in stores:
        await store.close()


async def test_rotate_key_reseals_rows_while_a_replica_runs(tmp_path: Path, database_url: str) -> None:
    """rotate-key --drop-old with AMO_DATABASE_URL: every row opens with the new key alone; a running replica
    that only knew the old key picks the new one up from the key file instead of failing."""
    key_file = tmp_path / "vault-key"
    key_file.write_text(Fernet.generate_key().decode() + "\n")
    old = KeyRing.parse(key_file.read_text())
    running = await _opened(database_url, old, key_source=lambda: load_keyring(key_file, None, None))
    for n in range(1201):  # more than two batches
        await running.put_account(_account(str(n)))
    env = {"AMO_VAULT_KEY_FILE": str(key_file), "AMO_VAULT_PATH": str(tmp_path / "state" / "vault.enc"),
           "AMO_DATABASE_URL": database_url}
    result = _cli("rotate-key", "--drop-old", env=env)
    assert result.returncode == 0, result.stderr
    assert "1201 database row(s) re-encrypted" in result.stdout
    new = KeyRing.parse(key_file.read_text())
    assert len(new.keys) == 1 and new.keys != old.keys
    fresh = await _opened(database_url, new)
    assert len((await fresh.reload()).accounts) == 1201
    assert len((await running.reload()).accounts) == 1201  # the replica reloaded the key file
    with pytest.raises(VaultUndecryptable):
        await _opened(database_url, old)
    await fresh.close()
    await running.close()


async def test_migrate_state_round_trip_loses_nothing_and_is_idempotent(tmp_path: Path, database_url: str) -> None:
    key_file = tmp_path / "vault-key"
    key_file.write_text(Fernet.generate_key().decode() + "\n")
    keys = KeyRing.parse(key_file.read_text())
    source = Vault(tmp_path / "state" / "vault.enc", keys)
    source.prepare()
    original = VaultData(accounts={"7": _account("7"), "8": _account("8")},
                         states={"s" * 64: PendingState("authorize", 1.0, 3e9, "l")}, exchange_slots={"x" * 64: 3e9})
    source.save(original)
    env = {"AMO_VAULT_KEY_FILE": str(key_file), "AMO_VAULT_PATH": str(source.path)}
    for _ in range(2):  # idempotent
        result = _cli("migrate-state", "--to", database_url, env=env)
        assert result.returncode == 0, result.stderr
        assert "2 account(s), 1 pending state(s), 1 exchange slot(s)" in result.stdout
    back = Vault(tmp_path / "back" / "vault.enc", keys)
    back.prepare()
    back.save(VaultData(accounts={"9": _account("9")}))  # the target's own records stay
    for _ in range(2):
        result = _cli("migrate-state", "--to", f"file:{back.path}", env={**env, "AMO_DATABASE_URL": database_url})
        assert result.returncode == 0, result.stderr
    returned = Vault(back.path, keys).load()
    assert returned.accounts == {**original.accounts, "9": _account("9")}
    assert returned.states == original.states and returned.exchange_slots == original.exchange_slots


async def test_a_connection_lost_mid_refresh_never_resends_the_spent_token(
        make_rig: RigFactory, database_url: str, postgres: ThrowawayPostgres, aiohttp_client: Any) -> None:
    """Every database connection is cut while replica 1's refresh is at amoCRM and replica 2 wants one too:
    replica 2 waits out replica 1's lease, replica 1 stores its answer over a new connection, and amoCRM
    sees the refresh token once."""
    rig = await make_rig(database_url=database_url, run_refresher=False)
    await rig.connect()
    other = await _second_gateway(rig, aiohttp_client)
    account = str(ACCOUNT_ID)
    seen = (await rig.app[STORE].account(account)).tokens.access_token  # type: ignore[union-attr]
    rig.sandbox.delay["token"] = 1.0
    first = asyncio.ensure_future(rig.app[MANAGER].refresh(account, seen=seen))
    await asyncio.sleep(0.4)
    second = asyncio.ensure_future(other.app[MANAGER].refresh(account, seen=seen))
    await asyncio.sleep(0.1)
    with psycopg.connect(postgres.admin_url, autocommit=True) as admin:
        cut = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s "
                            "AND pid <> pg_backend_pid()", (database_url.rsplit("/", 1)[1],)).fetchone()
    assert cut is not None and cut[0] >= 2
    outcomes = await asyncio.wait_for(asyncio.gather(first, second), 30)
    assert [o.result for o in outcomes] == ["refreshed", "skipped"]
    assert rig.sandbox.refresh_tokens_reused == 0 and sum(rig.sandbox.refresh_tokens_presented.values()) == 1
    stored = (await other.app[STORE].reload()).accounts[account]
    assert stored.tokens == outcomes[0].pair and stored.in_flight is None


@pytest.fixture
def own_server() -> Any:
    """A server of its own, for the test that stops it."""
    bindir = _bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries")
    server = ThrowawayPostgres(bindir)
    server.init()
    yield server
    server.destroy()


async def test_with_the_database_down_readyz_says_so_and_token_serves_the_cached_pair(
        make_rig: RigFactory, own_server: ThrowawayPostgres) -> None:
    rig = await make_rig(database_url=own_server.database())
    await rig.connect()
    fine = await rig.client.get(rig.url("/token"), headers=rig.admin)
    before = await fine.json()
    assert "Warning" not in fine.headers
    own_server.stop()
    ready = await rig.client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["reason"] == "state_unavailable"
    token = await rig.client.get(rig.url("/token"), headers=rig.admin)
    assert token.status == 200 and (await token.json())["access_token"] == before["access_token"]
    assert "database is unreachable" in token.headers["Warning"]
    own_server.start()
    for _ in range(100):
        if (await rig.client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("/readyz never recovered after the database came back")


async def test_two_gateways_through_a_database_restart_never_send_a_refresh_token_twice(
        make_rig: RigFactory, own_server: ThrowawayPostgres, aiohttp_client: Any) -> None:
    """2-second tokens, two replicas refreshing and serving /token, the database stopped for a second and
    started again midway: no refresh token reaches amoCRM twice, and the account comes out connected."""
    rig = await make_rig(database_url=own_server.database(), refresh_margin=1, sandbox_access_ttl=2)
    await rig.connect()
    other = await _second_gateway(rig, aiohttp_client)
    statuses: list[int] = []

    async def hammer(client: Any) -> None:
        for _ in range(300):
            statuses.append((await client.get(rig.url("/token"), headers=rig.admin)).status)
            await asyncio.sleep(0.02)

    async def restart() -> None:
        await asyncio.sleep(2)
        await asyncio.to_thread(own_server.stop)
        await asyncio.sleep(1)
        await asyncio.to_thread(own_server.start)

    await asyncio.gather(hammer(rig.client), hammer(other), restart())
    for _ in range(100):  # both replicas settle after the restart
        if (await rig.client.get(rig.url("/token"), headers=rig.admin)).status == 200:
            break
        await asyncio.sleep(0.1)
    assert rig.sandbox.refresh_tokens_reused == 0
    assert set(statuses) <= {200, 503} and statuses.count(200) > len(statuses) / 2
    account = (await other.app[STORE].reload()).accounts[str(ACCOUNT_ID)]
    assert account.status == "connected", account.reason


async def test_a_miss_catches_up_without_reading_every_account(database_url: str, keys: KeyRing) -> None:
    """reload() (a `?account=` nobody has, a probe) reads what changed lately, not all 300 accounts again, and
    still sees a row another replica wrote a moment ago."""
    writer, reader = await _opened(database_url, keys), await _opened(database_url, keys)
    for n in range(300):
        await writer.put_account(_account(str(n)))
    await asyncio.sleep(6)  # past the overlap: those rows are no longer "lately" for the next catch-up
    await reader.reload()
    await writer.put_account(_account("new"))
    opened: list[str] = []
    original = reader._account
    reader._account = lambda row: opened.append(row[0]) or original(row)  # type: ignore[method-assign]
    assert "new" in (await reader.reload()).accounts
    assert set(opened) == {"new"}  # (announced and recent: read once or twice, never the other 300)
    await writer.close()
    await reader.close()


async def test_start_up_reads_every_account_once_and_hears_what_follows(database_url: str, keys: KeyRing) -> None:
    """open() listens before its one full read: the reads after start-up do not decrypt every account again (at
    100 000 accounts that was 12 s more, on the first request), and a write made after start-up is still heard."""
    writer = await _opened(database_url, keys)
    for n in range(50):
        await writer.put_account(_account(str(n)))
    reader = PgStore(database_url, keys)
    opened: list[str] = []
    original = reader._account
    reader._account = lambda row: opened.append(row[0]) or original(row)  # type: ignore[method-assign]
    await reader.open()
    await asyncio.sleep(0.3)  # the listener is up and the read throttle has passed
    assert len((await reader.snapshot()).accounts) == 50
    await writer.put_account(_account("new"))
    for _ in range(100):
        if "new" in (await reader.snapshot()).accounts:
            break
        await asyncio.sleep(0.05)
    assert "new" in (await reader.snapshot()).accounts
    assert opened.count("1") == 1 and opened.count("new") == 1
    await writer.close()
    await reader.close()


async def test_status_and_forget_work_on_the_database(tmp_path: Path, database_url: str) -> None:
    key_file = tmp_path / "vault-key"
    key_file.write_text(Fernet.generate_key().decode() + "\n")
    store = await _opened(database_url, KeyRing.parse(key_file.read_text()))
    await store.put_account(_account("7"))
    env = {"AMO_VAULT_KEY_FILE": str(key_file), "AMO_VAULT_PATH": str(tmp_path / "state" / "vault.enc"),
           "AMO_DATABASE_URL": database_url}
    status = await asyncio.to_thread(_cli, "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert [row["account_id"] for row in json.loads(status.stdout)] == ["7"]
    forgotten = await asyncio.to_thread(_cli, "forget", "acme", "--yes", env=env)
    assert forgotten.returncode == 0, forgotten.stderr
    assert (await store.reload()).accounts == {}
    assert not (tmp_path / "state" / "vault.enc").exists()  # the database was changed, not a vault file
    await store.close()


def test_a_throwaway_server_whose_test_process_dies_stops_by_itself(tmp_path: Path) -> None:
    """tests/pg.py's watchdog: a test process killed before teardown must not leave its server running."""
    bindir = _bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries") if os.environ.get("CI") != "true" else pytest.fail("no PostgreSQL")
    owner = ("import os, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from tests.pg import "
             "ThrowawayPostgres; pg = ThrowawayPostgres(Path(sys.argv[2])); pg.init(); print(pg.root, pg.port, "
             "flush=True); os._exit(9)")  # dies like a killed test: no destroy()
    done = subprocess.run([sys.executable, "-c", owner, str(Path(__file__).parent.parent), str(bindir)],
                          capture_output=True, text=True, timeout=60, check=False)
    root, port = done.stdout.split()
    assert done.returncode == 9  # its server was up (pg_ctl -w) when it died
    for _ in range(100):
        if not Path(root).exists():
            break
        time.sleep(0.1)
    assert not Path(root).exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://amo@127.0.0.1:{port}/postgres", connect_timeout=2)
