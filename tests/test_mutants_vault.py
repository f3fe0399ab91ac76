"""The vault's key file and its operator-facing errors (vault.py), pinned exactly: tests the mutation gate asked for."""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from amo_gateway.errors import ConfigError, VaultError, VaultUndecryptable
from amo_gateway.tokens import Account, VaultData
from amo_gateway.vault import TEMP_TAG, KeyRing, Vault, load_keyring, write_key_file
from tests.test_mutants_store import _disk_full_once


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


def test_prepare_creates_missing_parents_private(tmp_path: Path, keys: KeyRing) -> None:
    """A vault path under directories that do not exist yet: they are created, the vault's own one 0700."""
    vault = Vault(tmp_path / "a" / "b" / "vault.enc", keys)
    vault.prepare()
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700


def test_private_directory_of_another_owner_is_accepted(tmp_path: Path, keys: KeyRing,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0700 directory someone else owns (e.g. made by systemd's StateDirectory) is fine as it is."""
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: directory.stat().st_uid + 1)
    Vault(directory / "vault.enc", keys).prepare()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_loose_directory_of_another_owner_is_refused_by_name(tmp_path: Path, keys: KeyRing,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory others can read, that is not ours to chmod, stops start-up with the directory's name."""
    directory = tmp_path / "state"
    directory.mkdir()
    directory.chmod(0o755)
    monkeypatch.setattr(os, "getuid", lambda: directory.stat().st_uid + 1)
    with pytest.raises(VaultError) as caught:
        Vault(directory / "vault.enc", keys).prepare()
    assert str(caught.value) == f"vault directory {directory} is readable by others and not ours to fix"


def test_key_errors_tell_the_operator_what_to_do() -> None:
    """No key names the settings to use; a bad key says how to make a good one."""
    with pytest.raises(ConfigError) as none_given:
        KeyRing([])
    assert str(none_given.value) == ("no vault key: set AMO_VAULT_KEY_FILE (or a systemd credential"
                                     " 'vault-key')")
    with pytest.raises(ConfigError) as bad:
        KeyRing(["not-a-key"])
    assert str(bad.value) == "a vault key is not a valid Fernet key (make one with `amo-gateway gen-key`)"


def test_decode_reads_a_backup_with_the_vaults_keys_and_leaves_the_vault_file_alone(tmp_path: Path) -> None:
    """restore's check of a backup: another vault file's bytes decrypt to its data; the live file is untouched."""
    keys = KeyRing([Fernet.generate_key().decode()])
    backup = Vault(tmp_path / "backup" / "vault.enc", keys)
    backup.prepare()
    backup.save(VaultData(accounts={"7": Account("7", "https://a.amocrm.ru")}))
    live = Vault(tmp_path / "live" / "vault.enc", keys)
    live.prepare()
    live.save(VaultData())
    before = live.path.read_bytes()
    assert live.decode(backup.path.read_bytes()).accounts == {"7": Account("7", "https://a.amocrm.ru")}
    assert live.path.read_bytes() == before
    with pytest.raises(VaultUndecryptable, match="does not decrypt with the configured keys"):
        Vault(live.path, KeyRing([Fernet.generate_key().decode()])).decode(backup.path.read_bytes())


def test_a_key_file_that_is_not_text_is_named_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "vault.key"
    path.write_bytes(b"\xff\xfe not a key\n")
    with pytest.raises(ConfigError) as refused:
        load_keyring(path, None, None)
    assert refused.value.detail == f"cannot read vault key file {path}: not UTF-8 text"


def _one_account(data: VaultData, account_id: str = "1") -> None:
    data.accounts[account_id] = Account(account_id, "https://a.amocrm.ru")


def test_a_plain_vault_update_on_a_full_disk_keeps_the_reserve(tmp_path: Path, keys: KeyRing,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Vault.update spends the reserve only when told to: `restore` and `migrate-state` call it directly."""
    vault = Vault(tmp_path / "vault.enc", keys)
    vault.update(_one_account)
    vault.reserve.ensure()
    saves = _disk_full_once(vault, monkeypatch)
    with pytest.raises(OSError):
        vault.update(lambda data: _one_account(data, "2"))
    assert saves[0] == 1 and vault.reserve.path.exists()


def test_spending_the_reserve_is_logged_as_an_error_naming_the_vault(
        tmp_path: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The disk filled while amoCRM answered: the pair is saved, and an ERROR line tells the operator why."""
    caplog.set_level(logging.INFO, logger="amo_gateway")
    vault = Vault(tmp_path / "vault.enc", keys)
    vault.update(_one_account)
    vault.reserve.ensure()
    _disk_full_once(vault, monkeypatch)
    vault.update(lambda data: _one_account(data, "2"), spend_reserve=True)
    assert set(Vault(vault.path, keys).load().accounts) == {"1", "2"}
    spent = [(r.levelno, r.name, getattr(r, "fields", None)) for r in caplog.records
             if r.getMessage() == "vault.reserve_spent"]
    assert spent == [(logging.ERROR, "amo_gateway.vault", {
        "path": str(vault.path),
        "detail": "the disk filled up while amoCRM answered; the reserve made room for the new pair"})]


def test_the_lock_is_the_file_beside_the_vault_that_every_install_locks(tmp_path: Path, keys: KeyRing) -> None:
    """`<vault>.lock` (README): an older CLI or a second gateway locks that very name, so it must not move."""
    path = tmp_path / "vault.enc"
    Vault(path, keys).update(_one_account)
    fd = os.open(f"{path}.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()

    def write() -> None:
        Vault(path, keys).update(lambda data: _one_account(data, "2"))
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert not done.wait(0.3)  # held off by the lock another holder took on `<vault>.lock`
    finally:
        os.close(fd)
    writer.join(5)
    assert done.is_set() and set(Vault(path, keys).load().accounts) == {"1", "2"}


def test_a_symlinked_vault_or_lock_is_refused_by_name(tmp_path: Path, keys: KeyRing) -> None:
    """A planted symbolic link is named, with what to do about it."""
    real = tmp_path / "elsewhere.enc"
    real.write_bytes(b"")
    path = tmp_path / "vault.enc"
    path.symlink_to(real)
    with pytest.raises(VaultError) as vault_link:
        Vault(path, keys).prepare()
    assert str(vault_link.value) == (f"vault path {path} is a symbolic link; point AMO_VAULT_PATH at the real"
                                     " file")
    path.unlink()
    lock = tmp_path / "vault.enc.lock"
    lock.symlink_to(real)
    with pytest.raises(VaultError) as lock_link:
        Vault(path, keys).update(_one_account)
    assert str(lock_link.value) == f"{lock} is a symbolic link; refusing to follow it (remove it)"


_KILLED_MID_WRITE = """
import os, sys
from pathlib import Path
from cryptography.fernet import Fernet
from amo_gateway.tokens import VaultData
from amo_gateway.vault import KeyRing, Vault
os.replace = lambda *args: os._exit(9)  # killed after the temp file is written, before it replaces the vault
Vault(Path(sys.argv[1]), KeyRing([Fernet.generate_key().decode()])).save(VaultData())
"""


def test_the_temp_file_of_a_writer_killed_mid_write_is_swept_at_start(tmp_path: Path, keys: KeyRing) -> None:
    """A writer killed before its rename leaves a whole encrypted copy behind; the next start removes it."""
    path = tmp_path / "vault.enc"
    Vault(path, keys).update(_one_account)
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(path)], check=False,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert killed.returncode == 9
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("vault.enc" + TEMP_TAG)]
    assert len(left) == 1
    Vault(path, keys).prepare()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vault.enc", "vault.enc.lock"]
    assert set(Vault(path, keys).load().accounts) == {"1"}
