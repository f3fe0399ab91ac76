"""The vault's key file and its operator-facing errors (vault.py), pinned exactly: tests the mutation gate asked for."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from amo_gateway.errors import ConfigError, VaultUndecryptable
from amo_gateway.vault import KeyRing, Vault, load_keyring, write_key_file


def test_key_file_is_written_whole_private_and_reads_back(tmp_path: Path) -> None:
    """rotate-key's write: mode 0600, one key per line with the primary first, no temp file left behind."""
    ring = KeyRing([Fernet.generate_key().decode()]).rotated()
    path = tmp_path / "vault.key"
    path.write_text("old contents that must go entirely\n" * 20)
    write_key_file(path, ring)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text(encoding="utf-8") == "\n".join(ring.keys) + "\n"
    assert load_keyring(path, None, None).keys == ring.keys
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vault.key"]


def test_key_file_write_replaces_the_file_never_edits_it(tmp_path: Path) -> None:
    """A reader holding the old key file open still reads the old keys: the new file is a new inode."""
    old, new = KeyRing([Fernet.generate_key().decode()]), KeyRing([Fernet.generate_key().decode()])
    path = tmp_path / "vault.key"
    write_key_file(path, old)
    with path.open(encoding="utf-8") as reader:
        write_key_file(path, new)
        assert reader.read() == old.keys[0] + "\n"
    assert load_keyring(path, None, None).keys == new.keys


def test_key_file_write_syncs_the_data_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key file is fsynced before it replaces the old one: a crash never leaves an empty key file."""
    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    write_key_file(tmp_path / "vault.key", KeyRing([Fernet.generate_key().decode()]))
    assert order == ["fsync", "replace"]


def test_inline_keys_may_be_comma_separated() -> None:
    """AMO_VAULT_KEY=new,old: the first encrypts, both decrypt."""
    new, old = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    ring = load_keyring(None, None, f"{new},{old}")
    assert ring.keys == [new, old]
    assert Fernet(new.encode()).decrypt(ring.encrypt(b"sealed")) == b"sealed"
    assert ring.decrypt(Fernet(old.encode()).encrypt(b"older")) == b"older"


def test_unreadable_key_file_is_named_in_the_error(tmp_path: Path) -> None:
    """A missing key file fails start-up with its path and the reason, not a traceback."""
    missing = tmp_path / "nowhere" / "vault.key"
    with pytest.raises(ConfigError) as caught:
        load_keyring(missing, None, None)
    assert str(caught.value) == f"cannot read vault key file {missing}: No such file or directory"


def test_undecryptable_vault_error_tells_the_operator_what_happened(tmp_path: Path, keys: KeyRing) -> None:
    """Wrong key: the error names the file, the likely causes, and that nothing was overwritten."""
    path = tmp_path / "vault.enc"
    Vault(path, keys).save(Vault(path, keys).load())
    stranger = Vault(path, KeyRing([Fernet.generate_key().decode()]))
    with pytest.raises(VaultUndecryptable) as caught:
        stranger.load()
    assert str(caught.value) == (f"vault {path} does not decrypt with the configured keys (wrong key, tampered or"
                                 " truncated); it was left untouched")


def test_malformed_vault_content_is_reported_as_such(tmp_path: Path, keys: KeyRing) -> None:
    """A file that decrypts to something other than vault JSON says so, distinctly from a wrong key."""
    path = tmp_path / "vault.enc"
    path.write_bytes(keys.encrypt(b'{"accounts": {"7": {}}}'))
    with pytest.raises(VaultUndecryptable) as caught:
        Vault(path, keys).load()
    assert str(caught.value) == f"vault {path} decrypts but its content is malformed"


def test_writer_reads_its_own_write_without_decrypting(tmp_path: Path, keys: KeyRing) -> None:
    """After save() the same Vault knows the file by its write id: the next load() costs no decryption."""
    vault = Vault(tmp_path / "vault.enc", keys)
    data = vault.load()
    data.exchange_slots["demo@example.com"] = 1.0
    vault.save(data)
    decrypts = 0
    real = keys.decrypt

    def counting(token: bytes) -> bytes:
        nonlocal decrypts
        decrypts += 1
        return real(token)

    keys.decrypt = counting  # type: ignore[method-assign]
    assert vault.load() == data
    assert decrypts == 0
