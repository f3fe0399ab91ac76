"""The shipped systemd unit: systemd-analyze's verdicts, and its contract with the app, run for real."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from amo_gateway.settings import CREDENTIAL_FILES, Settings, load_settings
from amo_gateway.tokens import VaultData
from amo_gateway.vault import KeyRing, Vault
from tests.conftest import free_port
from tests.deploy_procs import (
    ROOT,
    Credentials,
    NotifySocket,
    Process,
    gateway_command,
    gateway_env,
)
from tests.prerequisites import unavailable

UNIT = ROOT / "systemd" / "amo-gateway.service"
ENV_FILE = ROOT / "systemd" / "amo-gateway.env"
CTL = ROOT / "systemd" / "amo-gateway-ctl"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.usefixtures("analyze_available")
SECRET_VARIABLES = {"AMO_CLIENT_SECRET", "AMO_ADMIN_TOKEN", "AMO_CONSUMER_TOKENS", "AMO_VAULT_KEY",
                    "AMO_ALERT_WEBHOOK_SECRET", "AMO_ALERT_TELEGRAM_BOT_TOKEN"}
MAX_EXPOSURE = 2.0


@pytest.fixture
def analyze_available() -> None:
    """Skip without systemd-analyze, naming the reason; under CI fail (`make test` installs the package)."""
    if ANALYZE is None:
        unavailable("systemd-analyze is not installed (package systemd; `make test` installs it via "
                    "scripts/ensure-systemd.sh)")


def unit_values(key: str, path: Path = UNIT) -> list[str]:
    """Every value of `key` in the unit file, in order (systemd keys may repeat)."""
    pattern = re.compile(rf"^{re.escape(key)}=(.*)$")
    return [m.group(1).strip() for line in path.read_text(encoding="utf-8").splitlines()
            if (m := pattern.match(line.strip()))]


def env_file_values(path: Path = ENV_FILE) -> dict[str, str]:
    """KEY=value lines of an EnvironmentFile, comments and blanks skipped."""
    pairs = (line.split("=", 1) for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def verify_root(tmp_path: Path, unit_text: str) -> tuple[Path, Path]:
    """A root with the system's units, ExecStart's program (an empty script) and the unit to verify."""
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    program = root / unit_values("ExecStart")[0].split()[0].lstrip("/")
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n", encoding="utf-8")
    program.chmod(0o755)
    unit = root / "etc/systemd/system" / UNIT.name
    unit.parent.mkdir(parents=True)
    unit.write_text(unit_text, encoding="utf-8")
    return root, unit


def analyze_verify(root: Path, unit: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", f"--root={root}", str(unit)], capture_output=True, text=True,
                          timeout=60)


@needs_analyze
def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the shipped unit, in a root where ExecStart's path exists, says nothing."""
    result = analyze_verify(*verify_root(tmp_path, UNIT.read_text(encoding="utf-8")))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@needs_analyze
def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The same harness reports a misspelt key, so its silence above means something."""
    broken = UNIT.read_text(encoding="utf-8").replace("ProtectSystem=strict", "ProtectSistem=strict")
    result = analyze_verify(*verify_root(tmp_path, broken))
    assert "ProtectSistem" in result.stdout + result.stderr


@needs_analyze
def test_systemd_analyze_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=yes --threshold=20` passes and the overall exposure is <= 2.0."""
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}",
                             "--no-pager", str(UNIT)], capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for amo-gateway\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    print(f"systemd-analyze security exposure: {found.group(1)}")
    assert float(found.group(1)) <= MAX_EXPOSURE
    assert result.returncode == 0, result.stderr


def test_unit_loads_every_credential_the_app_reads() -> None:
    """LoadCredential= names are exactly vault-key plus settings.CREDENTIAL_FILES, from /etc/amo-gateway."""
    pairs = dict(v.split(":", 1) for v in unit_values("LoadCredential"))
    assert set(pairs) == {"vault-key", *CREDENTIAL_FILES.values()}
    assert all(source == f"/etc/amo-gateway/{name}" for name, source in pairs.items())


def test_unit_keeps_secrets_out_of_the_environment() -> None:
    """Neither the unit's Environment= lines nor the example EnvironmentFile set a secret setting."""
    unit_env = {v.split("=", 1)[0] for v in unit_values("Environment")}
    assert not unit_env & SECRET_VARIABLES
    assert not set(env_file_values()) & SECRET_VARIABLES
    assert unit_values("EnvironmentFile") == ["/etc/amo-gateway/amo-gateway.env"]


def test_example_environment_file_is_valid_settings() -> None:
    """The shipped EnvironmentFile (plus the unit's AMO_VAULT_PATH) validates as the gateway's settings."""
    environ = env_file_values() | dict(v.split("=", 1) for v in unit_values("Environment"))
    settings = load_settings(None, environ=environ)
    assert settings.host == "127.0.0.1"
    assert settings.trusted_proxies == ["127.0.0.1", "::1"]
    assert str(settings.vault_path) == f"/var/lib/{unit_values('StateDirectory')[0]}/vault.enc"


def test_stop_timeout_outlasts_the_graceful_shutdown() -> None:
    """TimeoutStopSec exceeds three shutdown stages (requests, refresher, sent refreshes) of AMO_SHUTDOWN_TIMEOUT."""
    shutdown = float(env_file_values().get("AMO_SHUTDOWN_TIMEOUT", Settings().shutdown_timeout))
    assert float(unit_values("TimeoutStopSec")[0]) > 3 * shutdown
    assert unit_values("Type") == ["notify"]
    assert unit_values("Restart") == ["on-failure"]
    assert float(unit_values("WatchdogSec")[0]) > 0


def test_gateway_speaks_the_units_notify_protocol(tmp_path: Path) -> None:
    """Run as the unit runs it (ExecStart's arguments, credentials dir): READY=1, WATCHDOG=1, clean SIGTERM."""
    exec_args = unit_values("ExecStart")[0].split()[1:]
    assert exec_args[0] == "serve"
    notify = NotifySocket(tmp_path / "notify")
    creds = Credentials(tmp_path / "credentials")
    env = gateway_env(port=free_port(), vault=tmp_path / "state" / "vault.enc", credentials=creds.write(),
                      redirect_uri="https://gateway.example.com/callback", base_url="http://127.0.0.1:9",
                      notify=notify.path, watchdog_usec=400_000)
    gateway = Process.start("gateway", [*gateway_command()[:-1], *exec_args], tmp_path / "gateway.log", env)
    try:
        notify.wait_for("READY=1", 20)
        notify.wait_for("WATCHDOG=1", 5)
        gateway.popen.send_signal(signal.SIGTERM)
        assert gateway.popen.wait(15) == 0, gateway.output()[-2000:]
        assert any("STOPPING=1" in m for m in notify.wait_for("STOPPING=1", 1))
    finally:
        gateway.stop()
        notify.close()
    assert creds.client_secret not in gateway.output()


def _fake_bin(directory: Path, name: str, log: Path) -> None:
    """A stand-in command that appends its arguments to `log`, one invocation per line."""
    directory.mkdir(exist_ok=True)
    script = directory / name
    script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n', encoding="utf-8")
    script.chmod(0o755)


_RUNNING_SYSTEMD_RUN = """#!{python}
import os, shutil, subprocess, sys, tempfile
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write("systemd-run " + " ".join(args) + "\\n")
env, creds, i = dict(os.environ), tempfile.mkdtemp(), 0
while args[i].startswith("-"):
    if args[i] != "-p":
        i += 1
        continue
    key, _, value = args[i + 1].partition("=")
    if key == "LoadCredential":
        name, _, path = value.partition(":")
        shutil.copy(path, os.path.join(creds, name))
    elif key == "Environment":
        env.update([value.split("=", 1)])
    elif key == "EnvironmentFile":
        env.update(line.split("=", 1) for line in open(value).read().splitlines() if "=" in line and line[0] != "#")
    i += 2
sys.exit(subprocess.run(args[i:], env={{**env, "CREDENTIALS_DIRECTORY": creds}}).returncode)
"""


def _running_systemd_run(directory: Path, log: Path) -> None:
    """A stand-in systemd-run that logs its arguments, then runs the command with the -p credentials and env."""
    directory.mkdir(exist_ok=True)
    script = directory / "systemd-run"
    script.write_text(_RUNNING_SYSTEMD_RUN.format(python=sys.executable, log=str(log)), encoding="utf-8")
    script.chmod(0o755)


def _ctl_box(tmp_path: Path, key: str) -> tuple[Path, Path, Path, dict[str, str]]:
    """A stand-in box for amo-gateway-ctl: /etc/amo-gateway with every credential file the unit loads, the state
    directory, a call log, and an environment whose systemd-run runs the command (and systemctl only logs)."""
    program = Path(sys.executable).with_name("amo-gateway")
    if not program.exists():
        pytest.skip("the amo-gateway console script is not installed in this virtualenv (make install)")
    etc, state, log = tmp_path / "etc", tmp_path / "state", tmp_path / "calls.log"
    etc.mkdir()
    (etc / "vault-key").write_text(key + "\n", encoding="utf-8")
    shutil.copy(ENV_FILE, etc / "amo-gateway.env")
    for name in ("client-secret", "admin-token", "consumer-tokens", "alert-webhook-secret", "alert-telegram-bot-token",
                 "database-url"):
        (etc / name).write_text("x\n" if name in ("client-secret", "admin-token") else "", encoding="utf-8")
    _fake_bin(tmp_path / "bin", "systemctl", log)
    _running_systemd_run(tmp_path / "bin", log)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AMO_")},
           "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "AMO_GATEWAY_ETC": str(etc),
           "AMO_GATEWAY_STATE": str(state), "AMO_GATEWAY_BIN": str(program)}
    return etc, state, log, env


def test_ctl_runs_cli_commands_with_the_units_user_state_and_credentials(tmp_path: Path) -> None:
    """`amo-gateway-ctl status` goes through systemd-run with the unit's user, state directory and credentials."""
    log = tmp_path / "calls.log"
    _fake_bin(tmp_path / "bin", "systemd-run", log)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(CTL), "status", "--json"], env=env, check=True, timeout=30)
    call = log.read_text(encoding="utf-8")
    for credential in unit_values("LoadCredential"):
        assert f"LoadCredential={credential}" in call
    for prop in ("DynamicUser", "User", "StateDirectory", "UMask", "EnvironmentFile"):
        assert f"{prop}={unit_values(prop)[0]}" in call
    assert f"Environment={unit_values('Environment')[0]}" in call
    assert call.rstrip().endswith("/opt/amo-gateway/.venv/bin/amo-gateway status --json")


def test_ctl_rotate_key_stops_rotates_and_restarts(tmp_path: Path) -> None:
    """rotate-key: stop, a new primary key in /etc's key file, the vault re-encrypted as the service user, start."""
    old_key = Fernet.generate_key().decode()
    etc, state, log, env = _ctl_box(tmp_path, old_key)
    program = Path(env["AMO_GATEWAY_BIN"])
    vault = Vault(state / "vault.enc", KeyRing([old_key]))
    vault.prepare()
    vault.save(VaultData())
    done = subprocess.run(["bash", str(CTL), "rotate-key"], env=env, timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = log.read_text(encoding="utf-8").splitlines()
    assert [calls[0], calls[-1]] == ["systemctl stop amo-gateway.service", "systemctl start amo-gateway.service"]
    # The vault is rewritten only inside a transient unit as the service's user (root would follow symlinks).
    assert len(calls) == 3 and calls[1].startswith("systemd-run ") and calls[1].endswith(f"{program} reencrypt")
    for prop in ("DynamicUser", "User", "StateDirectory", "UMask"):
        assert f"-p {prop}={unit_values(prop)[0]}" in calls[1]
    keys = KeyRing.parse((etc / "vault-key").read_text(encoding="utf-8"))
    assert keys.keys[1:] == [old_key] and keys.keys[0] != old_key
    assert Vault(state / "vault.enc", KeyRing(keys.keys[:1])).read()[0] == VaultData()
    assert (etc / "vault-key").stat().st_mode & 0o777 == 0o600


def test_ctl_refuses_unknown_commands() -> None:
    """Anything but the listed operator commands is a usage error, not a pass-through."""
    result = subprocess.run(["bash", str(CTL), "serve"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert "usage:" in result.stderr



def test_ctl_covers_the_operator_tasks_as_the_service_user(tmp_path: Path) -> None:
    """import-token (token on a pipe, never argv), status, forget and audit all run through systemd-run."""
    _, state, log, env = _ctl_box(tmp_path, Fernet.generate_key().decode())
    program = Path(env["AMO_GATEWAY_BIN"])
    claims = {"account_id": 4242, "exp": int(time.time()) + 30 * 86400, "api_domain": "api-b.amocrm.ru"}
    token = ".".join(base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
                     for part in ({"alg": "RS256"}, claims, {"sig": 1}))
    token_file = tmp_path / "long-lived.jwt"
    token_file.write_text(token + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["bash", str(CTL), *args], env=env, timeout=60, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done

    ctl("import-token", str(token_file), "--host", "acme.amocrm.ru")
    rows = json.loads(ctl("status", "--json").stdout)
    assert [(r["account_id"], r["long_lived"]) for r in rows] == [("4242", True)]
    backup = tmp_path / "vault.backup"
    shutil.copy(state / "vault.enc", backup)
    backup.chmod(0o600)  # root's file: the service's user could not open it, so ctl hands it over on stdin
    ctl("forget", "4242", "--yes")
    assert json.loads(ctl("status", "--json").stdout) == []
    ctl("restore", str(backup))
    assert [r["account_id"] for r in json.loads(ctl("status", "--json").stdout)] == ["4242"]
    ctl("forget", "4242", "--yes")
    assert "account.forgotten" in ctl("audit").stdout
    assert "consent" not in ctl("reconnect").stderr  # prints its guidance on stdout, exits 0
    calls = log.read_text(encoding="utf-8")
    assert token not in calls  # the token travelled on stdin, never on a command line
    assert all(line.startswith("systemd-run ") for line in calls.splitlines())
    assert f"{program} import-token - --host acme.amocrm.ru" in calls
    assert f"{program} restore -" in calls


def test_ctl_rotate_key_drop_old_keeps_only_the_new_key(tmp_path: Path) -> None:
    """rotate-key --drop-old: after the service user re-encrypted the vault, /etc's key file holds one key."""
    old_key = Fernet.generate_key().decode()
    etc, state, _, env = _ctl_box(tmp_path, old_key)
    vault = Vault(state / "vault.enc", KeyRing([old_key]))
    vault.prepare()
    vault.save(VaultData())
    done = subprocess.run(["bash", str(CTL), "rotate-key", "--drop-old"], env=env, timeout=60, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    keys = KeyRing.parse((etc / "vault-key").read_text(encoding="utf-8"))
    assert len(keys.keys) == 1 and keys.keys[0] != old_key
    assert Vault(state / "vault.enc", keys).read()[0] == VaultData()
    assert (etc / "vault-key").stat().st_mode & 0o777 == 0o600
