"""The audit trail's files: append-only JSON lines, fsynced, rotated by size into a bounded number of old files.

Disk use is bounded by `max_bytes * (backups + 1)` plus one batch. Several gateway processes may share the
trail: each append holds an `flock` on the file it writes, and rotation happens under that lock, so a writer
that opened the file just before another rotated it notices (the path names a new inode) and opens again.
AuditFile is the trail's AuditSink (backends/base.py) for the vault file backend.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from amo_gateway.settings import Settings

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5


@dataclass(frozen=True)
class Rotation:
    """When the trail is rotated (its size would pass `max_bytes`) and how many old files are kept."""

    max_bytes: int = MAX_BYTES
    backups: int = BACKUPS


def audit_rotation(settings: Settings) -> Rotation:
    """The rotation the settings ask for (AMO_AUDIT_MAX_BYTES, AMO_AUDIT_BACKUPS)."""
    return Rotation(settings.audit_max_bytes, settings.audit_backups)


class AuditFile:
    """The trail as files beside the vault: appended and rotated in a thread."""

    def __init__(self, path: Path, rotation: Rotation | None = None) -> None:
        self.path = path
        self.rotation = rotation or Rotation()

    @property
    def where(self) -> str:
        return str(self.path)

    async def append(self, lines: Sequence[str]) -> None:
        await asyncio.to_thread(append_lines, self.path, lines, self.rotation)

    async def tail(self, limit: int | None) -> list[str]:
        """The last `limit` lines (all when None): from the current file's end when they are all there
        (a console page reads 64 KiB, not the whole trail), else from every file."""
        if limit is not None:
            lines = await asyncio.to_thread(tail_lines, self.path, TAIL_BYTES)
            if len(lines) > limit:
                return lines[-limit:]
        return await asyncio.to_thread(read_lines, self.path, limit)


TAIL_BYTES = 64 * 1024  # a console page reads this much of the file's end, never the whole trail


def open_append(path: Path) -> int:
    """The one place the trail is opened: write-only, append-only, created 0600, never through a symlink."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)


def backup_path(path: Path, number: int) -> Path:
    """`audit.log.1` is the newest old file, `audit.log.<backups>` the oldest."""
    return path.with_name(f"{path.name}.{number}")


def append_lines(path: Path, lines: Iterable[str], rotation: Rotation | None = None) -> None:
    """Blocking: append and fsync, rotating first when the file would grow past `rotation.max_bytes`."""
    rotation = rotation or Rotation()
    data = "".join(line + "\n" for line in lines).encode()
    fd = _open_current(path)
    try:
        size = os.fstat(fd).st_size
        if size and size + len(data) > rotation.max_bytes:
            _shift(path, rotation.backups)
            os.close(fd)  # releases the old file's lock; writers waiting on it will see the new inode
            fd = _open_current(path)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_current(path: Path) -> int:
    """Open and lock the file the path names now (a rotation may have moved the one we opened)."""
    while True:
        fd = open_append(path)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _names(path, fd):
            return fd
        os.close(fd)


def _names(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _shift(path: Path, backups: int) -> None:
    """audit.log -> .1 -> .2 …; the oldest beyond `backups` is dropped."""
    if backups <= 0:
        path.unlink(missing_ok=True)
        return
    backup_path(path, backups).unlink(missing_ok=True)
    for number in range(backups - 1, 0, -1):
        older = backup_path(path, number)
        if older.exists():
            os.replace(older, backup_path(path, number + 1))
    os.replace(path, backup_path(path, 1))


def read_lines(path: Path, tail: int | None = None) -> list[str]:
    """The trail's lines, oldest file first (the last `tail` of them), for `amo-gateway audit`."""
    files = sorted(path.parent.glob(path.name + ".*"), key=_backup_number, reverse=True)
    lines: list[str] = []
    for file in [f for f in files if _backup_number(f) > 0] + [path]:
        if file.exists():
            lines += file.read_text(encoding="utf-8").splitlines()
    return lines[-tail:] if tail else lines


def _backup_number(file: Path) -> int:
    suffix = file.suffix[1:]
    return int(suffix) if suffix.isdigit() else 0


def tail_lines(path: Path, size: int) -> list[str]:
    """Blocking: the complete lines within the last `size` bytes of the file ([] when it does not exist)."""
    try:
        with path.open("rb") as file:
            start = max(file.seek(0, os.SEEK_END) - size, 0)
            file.seek(start)
            data = file.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[1:] if start else lines  # the first line may be cut in the middle
