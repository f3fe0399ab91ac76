"""The vault file: Fernet-encrypted JSON, written atomically and durably, shared safely between processes.

Sync code on purpose: callers run it through `asyncio.to_thread` (store.py) or from the CLI.
Cross-process safety is an `flock` on `<vault>.lock`, a file that is never replaced, so the lock
always names the same inode. flock locks belong to an open file description, so two threads of one
process that each open the lock file exclude each other too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from amo_gateway.atomic import write_atomically
from amo_gateway.errors import ConfigError, VaultError, VaultUndecryptable
from amo_gateway.headroom import Reserve, no_room
from amo_gateway.logs import event
from amo_gateway.tokens import VaultData

T = TypeVar("T")
log = logging.getLogger("amo_gateway.vault")
Signature = tuple[int, int, int, int] | None


MAGIC = b"amo-vault/1 "
TEMP_TAG = ".tmp-"  # a write in progress is `vault.enc.tmp-<pid>-<random>`; prepare() sweeps dead ones


def _split(blob: bytes) -> tuple[bytes | None, bytes]:
    """(write id, Fernet token); a file without the header (written before it existed) has no id."""
    if blob.startswith(MAGIC):
        header, newline, token = blob.partition(b"\n")
        if newline:
            return header[len(MAGIC):], token
    return None, blob


class Unchanged(Generic[T]):
    """Returned by an update's change function to say: nothing changed, do not rewrite the file."""

    def __init__(self, value: T) -> None:
        self.value = value


class KeyRing:
    """The vault keys: the first encrypts, every one decrypts (MultiFernet)."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ConfigError("no vault key: set AMO_VAULT_KEY_FILE (or a systemd credential 'vault-key')")
        try:
            self._fernets = [Fernet(k.strip().encode()) for k in keys]
        except (ValueError, TypeError):
            raise ConfigError("a vault key is not a valid Fernet key (make one with `amo-gateway gen-key`)") from None
        self.keys = [k.strip() for k in keys]
        self._multi = MultiFernet(self._fernets)

    def __repr__(self) -> str:
        return f"KeyRing({len(self.keys)} keys)"

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """One key per line; blank lines and `#` comments are ignored."""
        lines = [ln.strip() for ln in text.splitlines()]
        return cls([ln for ln in lines if ln and not ln.startswith("#")])

    def encrypt(self, data: bytes) -> bytes:
        return self._multi.encrypt(data)

    def decrypt(self, token: bytes) -> bytes:
        return self._multi.decrypt(token)

    def rotated(self) -> KeyRing:
        """A ring with a new primary key in front of the current ones."""
        return KeyRing([Fernet.generate_key().decode(), *self.keys])


class Vault:
    """One encrypted file plus its lock file; every change is a locked read-modify-write."""

    def __init__(self, path: Path, keys: KeyRing) -> None:
        self.path = path
        self.keys = keys
        self.lock_path = path.with_name(path.name + ".lock")
        self.reserve = Reserve(path)
        self._path_str = str(path)
        self._known: tuple[bytes, VaultData] | None = None  # (write id, parsed copy) of the file as last seen

    def prepare(self) -> None:
        """Create the 0700 directory, tighten a looser one we own, and sweep temp files of dead writers."""
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.is_symlink():  # reads would follow it and the first write replace it: the vault would fork
            raise VaultError(f"vault path {self.path} is a symbolic link; point AMO_VAULT_PATH at the real file")
        info = directory.stat()
        if stat.S_IMODE(info.st_mode) & 0o077:
            if info.st_uid != os.getuid():
                raise VaultError(f"vault directory {directory} is readable by others and not ours to fix")
            directory.chmod(0o700)
        with self.locked():
            for leftover in directory.glob(self.path.name + TEMP_TAG + "*"):
                leftover.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cross-process lock (blocking) for the duration of the block."""
        fd = open_no_follow(self.lock_path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def signature(self) -> Signature:
        """A cheap change marker of the file (inode, size, mtime, ctime), or None when it does not exist."""
        try:
            info = os.stat(self._path_str)  # os.stat on a str: Path.stat's overhead shows on the /token hot path
        except FileNotFoundError:
            return None
        return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def load(self) -> VaultData:
        """Decrypt and parse; a missing file is an empty vault, an unreadable one raises VaultUndecryptable.

        The file opens with a plain random write id: when it is the one this object last wrote or read,
        the parsed copy it kept is returned instead of decrypting again (a large vault costs ~40 ms per
        1 000 accounts to decrypt and parse). An edited id only costs a full read.
        """
        try:
            blob = _read_no_follow(self._path_str)
        except FileNotFoundError:
            return VaultData()
        write_id, token = _split(blob)
        if write_id is not None and self._known is not None and self._known[0] == write_id:
            return self._known[1].copy()
        data = self._decrypt(token)
        self._known = (write_id, data.copy()) if write_id is not None else None
        return data

    def decode(self, blob: bytes) -> VaultData:
        """A vault file's bytes (a backup, say) decrypted with this vault's keys, without touching the file."""
        return self._decrypt(_split(blob)[1])

    def _decrypt(self, token: bytes) -> VaultData:
        try:
            return VaultData.from_dict(json.loads(self.keys.decrypt(token)))
        except InvalidToken:
            raise VaultUndecryptable(
                f"vault {self.path} does not decrypt with the configured keys (wrong key, tampered or truncated);"
                " it was left untouched"
            ) from None
        except (ValueError, KeyError, TypeError) as err:
            raise VaultUndecryptable(f"vault {self.path} decrypts but its content is malformed") from err

    def save(self, data: VaultData) -> None:
        """Atomic and durable: temp file in the same directory, fsync, os.replace, fsync the directory."""
        write_id = os.urandom(16).hex().encode()
        token = self.keys.encrypt(json.dumps(data.to_dict(), separators=(",", ":")).encode())
        write_atomically(self.path, MAGIC + write_id + b"\n" + token, TEMP_TAG)
        self._known = (write_id, data.copy())


    def update(self, change: Callable[[VaultData], T | Unchanged[T]], *, claim: bool = False,
               spend_reserve: bool = False) -> tuple[T, VaultData, Signature]:
        """Locked read-modify-write: `change` mutates the data in place; it is saved unless it says Unchanged.

        `claim` (before amoCRM is called): first make sure the reserve is in place, else OSError and nothing
        is read or written. `spend_reserve` (storing what amoCRM answered): a full disk frees the reserve and
        the write is tried once more.
        """
        with self.locked():
            if claim:
                self.reserve.ensure()
            data = self.load()
            result = change(data)
            if isinstance(result, Unchanged):
                return result.value, data, self.signature()
            if spend_reserve:
                self._save_with_reserve(data)
            else:
                self.save(data)
            return result, data, self.signature()

    def _save_with_reserve(self, data: VaultData) -> None:
        try:
            self.save(data)
        except OSError as err:
            if not (no_room(err) and self.reserve.release()):
                raise
            event(log, "vault.reserve_spent", level=logging.ERROR, path=str(self.path),
                  detail="the disk filled up while amoCRM answered; the reserve made room for the new pair")
            self.save(data)

    def read(self) -> tuple[VaultData, Signature]:
        """A consistent snapshot and the file signature it belongs to (both taken under the lock)."""
        with self.locked():
            return self.load(), self.signature()

    def reencrypt(self, keys: KeyRing) -> None:
        """Re-encrypt the vault under `keys` (its primary), under the lock; the old file is replaced atomically."""
        with self.locked():
            data = self.load()
            self.keys = keys
            self.save(data)


def open_no_follow(path: Path, flags: int) -> int:
    """os.open with O_NOFOLLOW (mode 0600 when created): a symlink planted in the state directory is refused."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise VaultError(f"{path} is a symbolic link; refusing to follow it (remove it)") from None
        raise


def _read_no_follow(path: str) -> bytes:
    fd = open_no_follow(Path(path), os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def load_keyring(key_file: Path | None, credentials_dir: str | None, inline_key: str | None) -> KeyRing:
    """The vault keys from AMO_VAULT_KEY_FILE, else $CREDENTIALS_DIRECTORY/vault-key, else AMO_VAULT_KEY."""
    if key_file is not None:
        return _read_key_file(key_file)
    if credentials_dir and (Path(credentials_dir) / "vault-key").is_file():
        return _read_key_file(Path(credentials_dir) / "vault-key")
    if inline_key:
        return KeyRing.parse(inline_key.replace(",", "\n"))
    return KeyRing([])


def _read_key_file(path: Path) -> KeyRing:
    try:
        return KeyRing.parse(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read vault key file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read vault key file {path}: not UTF-8 text") from None


def write_key_file(path: Path, keys: KeyRing) -> None:
    """Write the key file atomically, mode 0600."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(keys.keys) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
