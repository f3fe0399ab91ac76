"""The `amo-gateway` command (cli.py), run as the operator would: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cryptography.fernet import Fernet

from amo_gateway.tokens import Account, TokenPair, VaultData
from amo_gateway.vault import KeyRing, Vault


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AMO_") and k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "amo_gateway", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout, check=False)


def _vault_env(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    key_file = tmp_path / "vault-key"
    key_file.write_text(Fernet.generate_key().decode() + "\n")
    vault_path = tmp_path / "state" / "vault.enc"
    env = {"AMO_VAULT_KEY_FILE": str(key_file), "AMO_VAULT_PATH": str(vault_path)}
    return env, key_file, vault_path


def _seed_vault(key_file: Path, vault_path: Path) -> Vault:
    vault = Vault(vault_path, KeyRing.parse(key_file.read_text()))
    vault.prepare()
    pair = TokenPair("access-xyz", "refresh-xyz", 2_000_000_000, 1_700_000_000)
    vault.save(VaultData(accounts={"7": Account("7", "https://acme.amocrm.ru", pair, subdomain="acme")}))
    return vault


def test_gen_key_prints_a_fernet_key() -> None:
    """gen-key output is a usable Fernet key."""
    result = _run("gen-key")
    assert result.returncode == 0
    Fernet(result.stdout.strip().encode())


def test_production_start_names_the_missing_setting(tmp_path: Path) -> None:
    """Without --sandbox, a missing client secret stops start-up with the setting's name; no fallback."""
    env, _, _ = _vault_env(tmp_path)
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    result = _run("serve", "--config", str(config), env={**env, "AMO_DOMAIN": "acme.amocrm.ru", "AMO_CLIENT_ID": "x"})
    assert result.returncode == 2
    assert "AMO_CLIENT_SECRET" in result.stderr
    assert "SANDBOX" not in result.stderr


def test_undecryptable_vault_stops_start_up_and_is_left_alone(tmp_path: Path) -> None:
    """A vault written under another key: a clear error at start, the file unchanged."""
    env, key_file, vault_path = _vault_env(tmp_path)
    _seed_vault(key_file, vault_path)
    before = vault_path.read_bytes()
    key_file.write_text(Fernet.generate_key().decode())
    env |= {"AMO_DOMAIN": "acme.amocrm.ru", "AMO_CLIENT_ID": "x", "AMO_CLIENT_SECRET": "y",
            "AMO_REDIRECT_URI": "https://gw.example.com/cb", "AMO_ADMIN_TOKEN": "t", "AMO_GATEWAY_PORT": "0"}
    result = _run("serve", env=env)
    assert result.returncode == 2
    assert "does not decrypt" in result.stderr
    assert vault_path.read_bytes() == before


def test_rotate_key_reencrypts_and_keeps_old_keys_for_reading(tmp_path: Path) -> None:
    """After rotate-key the key file has a new first key, and the vault decrypts with it alone."""
    env, key_file, vault_path = _vault_env(tmp_path)
    _seed_vault(key_file, vault_path)
    old_key = key_file.read_text().strip()
    result = _run("rotate-key", env=env)
    assert result.returncode == 0, result.stderr
    keys = key_file.read_text().split()
    assert keys[1] == old_key and keys[0] != old_key
    assert Vault(vault_path, KeyRing([keys[0]])).load().accounts["7"].subdomain == "acme"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"


def test_status_lists_accounts_without_tokens(tmp_path: Path) -> None:
    """status prints host, state and expiry; never a token."""
    env, key_file, vault_path = _vault_env(tmp_path)
    _seed_vault(key_file, vault_path)
    result = _run("status", env=env)
    assert result.returncode == 0, result.stderr
    assert "acme.amocrm.ru" in result.stdout and "connected" in result.stdout
    assert "xyz" not in result.stdout
    as_json = _run("status", "--json", env=env)
    assert '"account_id": "7"' in as_json.stdout


def test_authorize_url_issues_a_state_the_vault_remembers(tmp_path: Path) -> None:
    """authorize-url prints the consent URL and stores its state for the callback."""
    env, key_file, vault_path = _vault_env(tmp_path)
    env |= {"AMO_CLIENT_ID": "client-1"}
    result = _run("authorize-url", env=env)
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert url.startswith("https://www.amocrm.ru/oauth?client_id=client-1&state=")
    assert url.endswith("mode=post_message")
    data = Vault(vault_path, KeyRing.parse(key_file.read_text())).load()
    assert len(data.states) == 1


async def test_running_service_picks_up_keys_after_rotate_key(tmp_path: Path) -> None:
    """rotate-key rewrites the key file; a Store reading that file re-reads it once instead of failing."""
    from amo_gateway.store import Store
    from amo_gateway.vault import load_keyring

    env, key_file, vault_path = _vault_env(tmp_path)
    vault = _seed_vault(key_file, vault_path)
    store = Store(vault, lambda: load_keyring(key_file, None, None))
    await store.reload()
    assert _run("rotate-key", env=env).returncode == 0
    data = await store.reload()
    assert data.accounts["7"].subdomain == "acme"
    assert store.vault.keys.keys == key_file.read_text().split()


def test_rotate_key_drop_old_leaves_only_the_new_key(tmp_path: Path) -> None:
    """rotate-key --drop-old: the vault opens with the one new key; the old one is gone from the key file."""
    env, key_file, vault_path = _vault_env(tmp_path)
    _seed_vault(key_file, vault_path)
    old = key_file.read_text().strip()
    result = _run("rotate-key", "--drop-old", env=env)
    assert result.returncode == 0, result.stderr
    keys = KeyRing.parse(key_file.read_text())
    assert len(keys.keys) == 1 and keys.keys[0] != old
    assert set(Vault(vault_path, keys).load().accounts) == {"7"}
