"""The vault file (vault.py): encryption, atomic writes, permissions, keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from amo_gateway.errors import ConfigError, VaultUndecryptable
from amo_gateway.tokens import Account, TokenPair, VaultData
from amo_gateway.vault import KeyRing, Vault, load_keyring


def _data(refresh: str = "r1") -> VaultData:
    return VaultData(accounts={"7": Account("7", "https://x.amocrm.ru", TokenPair("a", refresh, 100, 0))})


def _vault(tmp_path: Path, keys: KeyRing) -> Vault:
    vault = Vault(tmp_path / "state" / "vault.enc", keys)
    vault.prepare()
    return vault


def test_saved_vault_is_encrypted_and_reads_back(tmp_path: Path, keys: KeyRing) -> None:
    """No token is visible in the file; load gives back what was saved."""
    vault = _vault(tmp_path, keys)
    vault.save(_data("refresh-secret"))
    assert b"refresh-secret" not in vault.path.read_bytes()
    assert vault.load() == _data("refresh-secret")


def test_file_is_0600_in_a_0700_directory(tmp_path: Path, keys: KeyRing) -> None:
    """Permissions are tight whatever the umask."""
    old = os.umask(0o022)
    try:
        vault = _vault(tmp_path, keys)
        vault.save(_data())
    finally:
        os.umask(old)
    assert stat.S_IMODE(vault.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(vault.path.parent.stat().st_mode) == 0o700


def test_loose_directory_we_own_is_tightened(tmp_path: Path, keys: KeyRing) -> None:
    """Contract note 7: an existing 0755 directory owned by us becomes 0700."""
    directory = tmp_path / "state"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    _vault(tmp_path, keys)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


@pytest.mark.parametrize("damage", ["wrong_key", "tampered", "truncated"])
def test_undecryptable_vault_raises_and_is_never_overwritten(tmp_path: Path, keys: KeyRing, damage: str) -> None:
    """Wrong key, a flipped byte or a cut file: a clear error, and the file stays byte for byte."""
    vault = _vault(tmp_path, keys)
    vault.save(_data())
    blob = vault.path.read_bytes()
    if damage == "tampered":
        middle = len(blob) // 2  # inside the Fernet token, past the plain write-id header
        blob = blob[:middle] + (b"A" if blob[middle:middle + 1] != b"A" else b"B") + blob[middle + 1:]
    elif damage == "truncated":
        blob = blob[: len(blob) // 2]
    vault.path.write_bytes(blob)
    reader = Vault(vault.path, KeyRing([Fernet.generate_key().decode()]) if damage == "wrong_key" else keys)
    with pytest.raises(VaultUndecryptable):
        reader.load()
    with pytest.raises(VaultUndecryptable):
        reader.update(lambda data: data.exchange_slots.__setitem__("x", 1.0))
    assert vault.path.read_bytes() == blob


def test_interrupted_write_leaves_the_previous_vault_and_is_swept(tmp_path: Path, keys: KeyRing) -> None:
    """A temp file from a writer that died is ignored by readers and removed at start-up."""
    vault = _vault(tmp_path, keys)
    vault.save(_data("r1"))
    leftover = vault.path.with_name(vault.path.name + ".tmp-999-dead")
    leftover.write_bytes(b"half a vault")
    assert vault.load() == _data("r1")
    vault.prepare()
    assert not leftover.exists()


def test_multifernet_reads_old_keys_and_rotation_reencrypts(tmp_path: Path, keys: KeyRing) -> None:
    """After rotation the new primary encrypts, the old key alone no longer decrypts, both together do."""
    vault = _vault(tmp_path, keys)
    vault.save(_data())
    rotated = keys.rotated()
    vault.reencrypt(rotated)
    assert Vault(vault.path, rotated).load() == _data()
    assert Vault(vault.path, KeyRing(rotated.keys[1:] + rotated.keys[:1])).load() == _data()
    with pytest.raises(VaultUndecryptable):
        Vault(vault.path, keys).load()


def test_update_that_changes_nothing_does_not_rewrite(tmp_path: Path, keys: KeyRing) -> None:
    """Unchanged results skip the write (no needless fsync storms)."""
    from amo_gateway.vault import Unchanged

    vault = _vault(tmp_path, keys)
    vault.save(_data())
    before = vault.signature()
    value, _, _ = vault.update(lambda data: Unchanged(42))
    assert value == 42
    assert vault.signature() == before


def test_key_sources_follow_the_documented_precedence(tmp_path: Path) -> None:
    """Key file beats $CREDENTIALS_DIRECTORY/vault-key beats AMO_VAULT_KEY; none at all is a named error."""
    file_key, cred_key, inline_key = (Fernet.generate_key().decode() for _ in range(3))
    key_file = tmp_path / "keys"
    key_file.write_text(f"# primary first\n{file_key}\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "vault-key").write_text(cred_key)
    assert load_keyring(key_file, str(creds), inline_key).keys == [file_key]
    assert load_keyring(None, str(creds), inline_key).keys == [cred_key]
    assert load_keyring(None, None, inline_key).keys == [inline_key]
    with pytest.raises(ConfigError, match="AMO_VAULT_KEY_FILE"):
        load_keyring(None, None, None)
    with pytest.raises(ConfigError, match="not a valid Fernet key"):
        KeyRing(["not-a-key"])


def test_unchanged_file_is_not_decrypted_again_but_another_writer_is_seen(tmp_path: Path, keys: KeyRing) -> None:
    """The write id lets a reader skip decryption of the file it already knows, never of a newer one."""
    writer, reader = _vault(tmp_path, keys), Vault(tmp_path / "state" / "vault.enc", keys)
    writer.save(_data("r1"))
    decrypts = 0
    real = keys.decrypt

    def counting(token: bytes) -> bytes:
        nonlocal decrypts
        decrypts += 1
        return real(token)

    keys.decrypt = counting  # type: ignore[method-assign]
    assert reader.load() == _data("r1")
    assert reader.load() == _data("r1")
    assert decrypts == 1
    writer.save(_data("r2"))
    assert reader.load() == _data("r2")
    assert decrypts == 2
    mutated = reader.load()
    mutated.accounts.clear()
    assert reader.load() == _data("r2"), "callers may mutate what load() returns without touching the cache"
