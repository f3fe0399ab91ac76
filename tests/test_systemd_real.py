"""The shipped unit under a real systemd: PID 1 in fresh namespaces, the gateway in production mode.

tests/systemd_machine.py boots /lib/systemd/systemd in new PID, mount, network, UTS and IPC namespaces (nothing
of the machine's own /tmp, /etc, /var or services is touched). Into it go, as on a VPS:
- systemd/amo-gateway.service byte for byte, plus ONE test-only drop-in for LoadCredential= (see DROP_IN);
- /opt/amo-gateway/.venv built from Debian's /usr/bin/python3 with this checkout pip-installed;
- /etc/amo-gateway: the shipped amo-gateway.env with the integration pointed at the sandbox, and the secrets;
- amoCRM's stand-in, `python -m amo_gateway.sandbox`, started inside the namespaces with setsid.
Then READY=1, the seed's story, the journal, the watchdog, SIGKILL, a stop during a refresh and
amo-gateway-ctl (through the real systemd-run) are checked against what systemd itself reports.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.fernet import Fernet

from amo_gateway.settings import PREFIX
from amo_gateway.tokens import VaultData, fingerprint
from amo_gateway.vault import KeyRing, Vault
from tests.deploy_procs import API_KEY, CLIENT_ID, LOGIN, ROOT
from tests.prerequisites import unavailable
from tests.systemd_machine import (
    LOAD_CREDENTIALS,
    UNIT,
    Answer,
    Machine,
    missing_prerequisites,
    python_for_helpers,
    service_install,
)

pytestmark = pytest.mark.slow

SHIPPED_UNIT = ROOT / "systemd" / UNIT
CTL = str(ROOT / "systemd" / "amo-gateway-ctl")
GATEWAY_PORT, SANDBOX_PORT = 8080, 8099  # the shipped env file's port; the namespace's loopback is ours alone
API = f"http://127.0.0.1:{GATEWAY_PORT}{PREFIX}"
SANDBOX = f"http://127.0.0.1:{SANDBOX_PORT}"
ACCOUNT = "31920194"  # the sandbox's default account
ETC = "/etc/amo-gateway"
VAULT = "/var/lib/private/amo-gateway/vault.enc"  # DynamicUser keeps StateDirectory= under /var/lib/private
CONSUMER_TOKEN = "consumer-secret-for-systemd-test"

# Why a drop-in at all: LoadCredential= cannot work in this container. systemd creates the credentials directory
# but it stays root's (0700) and the unit's dynamic user gets "Permission denied" on $CREDENTIALS_DIRECTORY; a
# three-line unit with DynamicUser=yes and one LoadCredential= line shows the same, so it is the environment,
# not this unit. The stand-in keeps LoadCredential='s contract: at every start root copies the files the shipped
# lines name into a directory of the unit's own (0700, files 0400 owned by the dynamic user) and
# CREDENTIALS_DIRECTORY points there. On a VPS the shipped LoadCredential= lines are what runs.
# The same drop-in, as run-.service.d, covers the transient units amo-gateway-ctl starts with systemd-run
# (their names start with run-), so the script's own `-p LoadCredential=` properties are replaced likewise.
DROP_IN = """# TEST ONLY (tests/test_systemd_real.py), never installed on a VPS: stands in for LoadCredential=, which
# cannot work in the test's container (the dynamic user is denied its credentials directory there).
[Service]
LoadCredential=
RuntimeDirectory=test-credentials/%N
RuntimeDirectoryMode=0700
Environment=CREDENTIALS_DIRECTORY=/run/test-credentials/%N
ExecStartPre=+/run/amo-test/bin/load-credentials /run/test-credentials/%N {specs}
"""


def shipped(key: str) -> list[str]:
    """Every value of `key` in the shipped unit."""
    lines = SHIPPED_UNIT.read_text(encoding="utf-8").splitlines()
    return [line.split("=", 1)[1].strip() for line in lines if line.startswith(f"{key}=")]


@dataclass(frozen=True)
class Secrets:
    """The integration's secret and the operator token, made for this run (the files in /etc/amo-gateway)."""

    client_secret: str = field(default_factory=lambda: secrets.token_hex(32))
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))


@dataclass
class Deployment:
    """The booted machine with the unit started, the secrets the test wrote, and what it has seen."""

    machine: Machine
    secrets: Secrets
    connected: bool = False

    @property
    def client_secret(self) -> str:
        return self.secrets.client_secret

    @property
    def admin_token(self) -> str:
        return self.secrets.admin_token

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        return self.machine.http("GET", f"{API}{path}", headers)

    def stats(self) -> dict[str, Any]:
        return dict(self.machine.http("GET", f"{SANDBOX}/_sandbox/stats").json())

    def faults(self, switches: dict[str, Any]) -> None:
        assert self.machine.http("POST", f"{SANDBOX}/_sandbox/faults", body=switches).status == 200

    def show(self, prop: str) -> str:
        return self.machine.show(prop)

    def keys(self) -> KeyRing:
        return KeyRing.parse(self.machine.read_file(f"{ETC}/vault-key").decode())

    def vault(self, scratch: Path) -> VaultData:
        """The service's vault as the namespaces hold it, decrypted with the current key file."""
        scratch.mkdir(parents=True, exist_ok=True)
        copy = scratch / f"vault-{time.monotonic_ns()}.enc"
        copy.write_bytes(self.machine.read_file(VAULT))
        return Vault(copy, self.keys()).read()[0]

    def connect(self) -> dict[str, Any]:
        """The seed's story through the unit: exchange (202), amoCRM's callback answered; its record."""
        answer = self.machine.http("POST", f"{API}/exchange-api-key", self.admin, {"login": LOGIN, "api_key": API_KEY})
        assert answer.status == 202, answer.body
        self.machine.wait_until("the sandbox's callback to be answered", lambda: bool(self.answered()), 15)
        self.connected = True
        return self.answered()[-1]

    def answered(self) -> list[dict[str, Any]]:
        """The sandbox's exchange callbacks that the gateway has answered (or that failed)."""
        return [c for c in self.stats()["callbacks"] if c.get("status") is not None or c.get("error")]

    def ensure_connected(self) -> None:
        if not self.connected:
            self.connect()
        assert self.get("/test").status == 200

    def running_pid(self) -> int:
        assert (self.show("ActiveState"), self.show("SubState")) == ("active", "running")
        return int(self.show("MainPID"))

    def wait_restarted(self, restarts: int, old_pid: int, timeout: float) -> float:
        """Seconds until systemd counts one more restart and the new main process is up (READY=1 again)."""
        def back() -> bool:
            return (int(self.show("NRestarts")) > restarts and self.show("SubState") == "running"
                    and self.show("MainPID") not in ("0", str(old_pid)))
        return self.machine.wait_until("the unit to be restarted", back, timeout)

    def service_uid(self, pid: int | None = None) -> str:
        """The real uid of the unit's main process (its dynamic user)."""
        status = self.machine.read_file(f"/proc/{pid or self.running_pid()}/status").decode()
        return next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))

    def owner_and_mode(self, path: str) -> list[str]:
        return self.machine.run("stat", "-c", "%u %a", path).stdout.split()

    def unit_messages(self) -> list[str]:
        return [str(e.get("MESSAGE", "")) for e in self.machine.journal()]

    def ctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """amo-gateway-ctl as shipped, run as root inside the namespaces (its systemd-run is the real one)."""
        return self.machine.run("bash", CTL, *args, timeout=timeout)


def write_units(work: Path) -> None:
    """The shipped unit byte for byte, the credentials drop-in for it and for systemd-run's transient units."""
    units = work / "units"
    units.mkdir()
    (units / UNIT).write_bytes(SHIPPED_UNIT.read_bytes())
    specs = " ".join(shipped("LoadCredential"))
    for drop_in_dir in (f"{UNIT}.d", "run-.service.d"):
        (units / drop_in_dir).mkdir()
        (units / drop_in_dir / "test-credentials.conf").write_text(DROP_IN.format(specs=specs), encoding="utf-8")
    load = work / "bin" / "load-credentials"
    load.parent.mkdir()
    load.write_text(LOAD_CREDENTIALS, encoding="utf-8")
    load.chmod(0o755)


def write_etc(work: Path, made: Secrets) -> None:
    """/etc/amo-gateway: the shipped env file pointed at the sandbox, and root-only secret files."""
    etc = work / "etc"
    etc.mkdir(mode=0o700)
    env = (ROOT / "systemd" / "amo-gateway.env").read_text(encoding="utf-8")
    for old, new in [("AMO_CLIENT_ID=00000000-0000-0000-0000-000000000000", f"AMO_CLIENT_ID={CLIENT_ID}"),
                     ("AMO_REDIRECT_URI=https://gateway.example.com/api/v1/integrations/amo-crm/callback",
                      f"AMO_REDIRECT_URI={API}/callback"),
                     ("AMO_DOMAIN=example.amocrm.ru", "AMO_DOMAIN=demo.amocrm.ru")]:
        assert old in env, f"the shipped env file no longer holds {old!r}; update the test"
        env = env.replace(old, new)
    # Production mode (no --sandbox): only the account host is the stand-in, reached at AMO_BASE_URL. The
    # sandbox's exchange callback carries `referer=demo.amocrm.ru`, as amoCRM's does; the referer check
    # compares it with the configured account host (AMO_DOMAIN), whatever URL that host is reached at.
    env += (f"\n# tests/test_systemd_real.py: amoCRM is the sandbox on the namespace's loopback\n"
            f"AMO_BASE_URL={SANDBOX}\nAMO_TEST_CACHE_SECONDS=0\n")
    files = {"amo-gateway.env": env, "vault-key": Fernet.generate_key().decode() + "\n",
             "client-secret": made.client_secret + "\n", "admin-token": made.admin_token + "\n",
             "consumer-tokens": f"crm-sync:{CONSUMER_TOKEN}\n",
             "alert-webhook-secret": "", "alert-telegram-bot-token": "",  # empty: no alerts, as shipped
             "database-url": ""}  # empty: the vault file
    for name, text in files.items():
        (etc / name).write_text(text, encoding="utf-8")
        (etc / name).chmod(0o600)


def start_sandbox(machine: Machine, client_secret: str) -> None:
    argv = [sys.executable, "-m", "amo_gateway.sandbox", "--port", str(SANDBOX_PORT), "--client-id", CLIENT_ID,
            "--client-secret", client_secret, "--redirect-uri", f"{API}/callback", "--login", LOGIN,
            "--api-key", API_KEY, "--callback-delay", "0.05"]
    machine.start_helper("sandbox", argv, python_for_helpers())

    def up() -> bool:
        try:
            return machine.http("GET", f"{SANDBOX}/_sandbox/stats").status == 200
        except AssertionError:
            return False
    machine.wait_until("the sandbox to listen", up, 20)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Boot systemd in namespaces, install the unit as on a VPS, start the sandbox and the unit; always poweroff."""
    if reason := missing_prerequisites():
        unavailable(f"real-systemd tests not run: {reason}")
    began = time.monotonic()
    work = tmp_path_factory.mktemp("systemd-real")
    install = service_install(work / "venv-build")
    made = Secrets()
    write_units(work)
    write_etc(work, made)
    machine = Machine.boot(work, install)
    deployment = Deployment(machine, made)
    try:
        start_sandbox(machine, made.client_secret)
        started = machine.run("systemctl", "start", UNIT, check=False, timeout=120)
        assert started.returncode == 0, started.stderr + "\n".join(deployment.unit_messages()[-40:])
        yield deployment
    finally:
        machine.poweroff()
        print(f"\nreal systemd: booted, tested and powered off in {time.monotonic() - began:.1f} s")


def test_ready_arrives_and_the_unit_runs_as_shipped(deployment: Deployment) -> None:
    """`active (running)` after READY=1, from the shipped file plus only the credentials drop-in, as a dynamic user."""
    status = deployment.machine.run("systemctl", "status", "--no-pager", UNIT).stdout
    assert "active (running)" in status, status
    fragment = deployment.show("FragmentPath")
    assert fragment == f"/etc/systemd/system/{UNIT}"
    assert deployment.machine.read_file(fragment) == SHIPPED_UNIT.read_bytes()
    assert deployment.show("DropInPaths") == f"/etc/systemd/system/{UNIT}.d/test-credentials.conf"
    assert deployment.show("Type") == "notify"  # so "active" means READY=1 arrived (TimeoutStartSec otherwise)
    uid = deployment.service_uid()
    assert uid != "0"
    assert deployment.owner_and_mode(VAULT.rsplit("/", 1)[0]) == [uid, "700"]
    assert deployment.show("WatchdogUSec") == "30s"
    assert any('"gateway.listening"' in m for m in deployment.unit_messages())


def test_exchange_callback_test_token_through_the_unit(deployment: Deployment, tmp_path: Path) -> None:
    """The seed's story against the running unit: 202, the callback answered 200, /test connected, /token."""
    record = deployment.connect()
    assert record["status"] == 200, record
    assert "AMO CRM successfully connected" in record["body"]
    assert record["referer"] == "demo.amocrm.ru"  # sent as amoCRM sends it, and accepted
    public = deployment.get("/test")
    assert public.status == 200 and public.json()["status"] == "connected" and "account_id" not in public.json()
    test = deployment.get("/test", deployment.admin)
    assert test.status == 200, test.body
    assert test.json()["status"] == "connected" and str(test.json()["account_id"]) == ACCOUNT
    token = deployment.get("/token", {"Authorization": f"Bearer {CONSUMER_TOKEN}"})
    assert token.status == 200, token.body
    assert token.json()["access_token"] and "refresh_token" not in token.json()
    stored = deployment.vault(tmp_path).accounts[ACCOUNT]
    assert stored.tokens is not None and stored.tokens.access_token == token.json()["access_token"]
    assert deployment.owner_and_mode(VAULT) == [deployment.service_uid(), "600"]


def test_journal_holds_the_structured_events(deployment: Deployment, tmp_path: Path) -> None:
    """`journalctl -u amo-gateway -o json`: the gateway's JSON event lines, and no secret anywhere in them."""
    deployment.ensure_connected()
    entries = deployment.machine.journal()
    events = []
    for entry in entries:
        message = str(entry.get("MESSAGE", ""))
        if message.startswith("{") and entry.get("_SYSTEMD_UNIT") == UNIT:
            events.append(json.loads(message))
    names = {e["event"] for e in events}
    assert {"gateway.listening", "exchange.requested", "callback.connected", "http.access"} <= names, names
    assert all({"ts", "level", "logger", "event"} <= set(e) for e in events)
    pair = deployment.vault(tmp_path).accounts[ACCOUNT].tokens
    assert pair is not None and pair.refresh_token
    everything = "\n".join(str(e.get("MESSAGE", "")) for e in entries)
    for secret in (deployment.client_secret, deployment.admin_token, CONSUMER_TOKEN, pair.access_token,
                   pair.refresh_token):
        assert secret not in everything


def test_ctl_status_and_authorize_url_through_real_systemd_run(deployment: Deployment, tmp_path: Path) -> None:
    """amo-gateway-ctl status/authorize-url run as the service's user on its vault: the service accepts the state."""
    deployment.ensure_connected()
    rows = json.loads(deployment.ctl("status", "--json").stdout)
    assert [(r["account_id"], r["state"]) for r in rows] == [(ACCOUNT, "connected")]
    url = deployment.ctl("authorize-url", "--label", "systemd-test").stdout.strip()
    query = parse_qs(urlsplit(url).query)
    assert query["client_id"] == [CLIENT_ID] and query["state"][0]
    # The browser flow with that state: the sandbox's consent page approves and redirects to the callback.
    consent = deployment.machine.http("GET", f"{SANDBOX}/oauth?{urlsplit(url).query}")
    assert consent.status == 302, consent.body
    callback = deployment.machine.http("GET", consent.headers["Location"])
    assert callback.status == 200, callback.body
    assert deployment.owner_and_mode(VAULT) == [deployment.service_uid(), "600"]


def test_stop_during_a_refresh_leaves_a_live_pair(deployment: Deployment, tmp_path: Path) -> None:
    """`systemctl stop` while amoCRM holds a refresh: the stop waits, the vault keeps a pair amoCRM still honours."""
    deployment.ensure_connected()
    before = deployment.vault(tmp_path).accounts[ACCOUNT].tokens
    assert before is not None
    # The next API call answers 401, so the proxy refreshes once; amoCRM then holds the refresh for 4 s.
    deployment.faults({"fail_next": {"api": [401]}, "delay": {"token": 4}})
    token_hits = deployment.stats()["hits"].get("token", 0)
    proxied = subprocess.Popen(deployment.machine.http_argv("GET", f"{API}/proxy/api/v4/leads", deployment.admin),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deployment.machine.wait_until("the refresh to reach amoCRM",
                                      lambda: deployment.stats()["hits"].get("token", 0) > token_hits, 15)
        began = time.monotonic()
        deployment.machine.run("systemctl", "stop", UNIT, timeout=120)
        stop_seconds = time.monotonic() - began
    finally:
        out, _ = proxied.communicate(timeout=30)
    deployment.faults({"clear": True})
    after = deployment.vault(tmp_path).accounts[ACCOUNT]
    assert after.status == "connected" and after.tokens is not None and after.tokens.refresh_token
    # The stop let the new pair land (fingerprints compared, so a failure prints no token).
    assert fingerprint(after.tokens.refresh_token) != fingerprint(before.refresh_token)
    assert stop_seconds > 1.0, stop_seconds  # it really waited for the held refresh
    assert json.loads(out)["status"] == 200  # the request that was waiting for that refresh was answered too
    print(f"\nstop during a refresh took {stop_seconds:.1f} s")
    # The stored pair is the live one: after a start, the next forced refresh succeeds with no token reused.
    deployment.machine.run("systemctl", "start", UNIT, timeout=120)
    deployment.faults({"fail_next": {"api": [401]}})
    assert deployment.machine.http("GET", f"{API}/proxy/api/v4/leads", deployment.admin).status == 200
    stats = deployment.stats()
    assert stats["refresh_tokens_reused"] == 0
    final = deployment.vault(tmp_path).accounts[ACCOUNT]
    assert final.status == "connected" and final.tokens is not None
    assert fingerprint(final.tokens.refresh_token) not in {fingerprint(before.refresh_token),
                                                           fingerprint(after.tokens.refresh_token)}


def test_kill_9_is_restarted_with_the_vault_intact(deployment: Deployment, tmp_path: Path) -> None:
    """SIGKILL to the main process: Restart=on-failure brings it back, the vault byte for byte the same."""
    deployment.ensure_connected()
    blob, pid = deployment.machine.read_file(VAULT), deployment.running_pid()
    restarts = int(deployment.show("NRestarts"))
    before = deployment.vault(tmp_path)
    deployment.machine.run("systemctl", "kill", "--signal=SIGKILL", UNIT)
    seconds = deployment.wait_restarted(restarts, pid, 45)
    print(f"\nkill -9: back in {seconds:.1f} s (RestartSec={shipped('RestartSec')[0]})")
    assert any("status=9/KILL" in m for m in deployment.unit_messages())
    assert deployment.machine.read_file(VAULT) == blob
    assert deployment.vault(tmp_path) == before
    assert deployment.get("/test").status == 200


def test_watchdog_restarts_a_wedged_loop(deployment: Deployment) -> None:
    """SIGSTOP the main process: WATCHDOG=1 stops, systemd kills and restarts it within WatchdogSec + RestartSec."""
    deployment.ensure_connected()
    restarts, pid = int(deployment.show("NRestarts")), deployment.running_pid()
    deployment.machine.run("kill", "-STOP", str(pid))
    seconds = deployment.wait_restarted(restarts, pid, 75)
    print(f"\nwedged loop: restarted {seconds:.1f} s after SIGSTOP (WatchdogSec={shipped('WatchdogSec')[0]})")
    assert any("Watchdog timeout" in m for m in deployment.unit_messages())
    assert deployment.get("/test").status == 200


def test_ctl_rotate_key_through_real_systemd(deployment: Deployment, tmp_path: Path) -> None:
    """amo-gateway-ctl rotate-key: stop, re-encrypt under a new primary key, hand the vault back, start."""
    deployment.ensure_connected()
    old_keys, pid = deployment.keys(), deployment.running_pid()
    before = deployment.vault(tmp_path)
    deployment.ctl("rotate-key", timeout=150)
    new_keys = deployment.keys()
    assert new_keys.keys[1:] == old_keys.keys and new_keys.keys[0] not in old_keys.keys
    new_pid = deployment.running_pid()
    assert new_pid != pid
    scratch = tmp_path / "only-new-key"
    scratch.mkdir()
    copy = scratch / "vault.enc"
    copy.write_bytes(deployment.machine.read_file(VAULT))
    assert Vault(copy, KeyRing(new_keys.keys[:1])).read()[0] == before
    assert deployment.owner_and_mode(VAULT) == [deployment.service_uid(new_pid), "600"]  # handed back
    assert deployment.get("/test").status == 200
