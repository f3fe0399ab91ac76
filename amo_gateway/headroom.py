"""Disk headroom for the vault: a refresh is claimed only when its result is sure to fit on the disk.

amoCRM spends a refresh token the moment it answers, so the write that stores the new pair must not fail
for lack of space. A free-space check before the claim is not enough (anything on the disk, even our own
logs, may fill it while amoCRM answers), so the room is held: a reserve file beside the vault
(`<vault>.reserve`, twice the vault's size plus SLACK, its blocks really allocated). A refresh is claimed
only once the reserve is in place; when it cannot be made, the refresh is refused before anything is sent.
When the write after amoCRM's answer still meets a full disk, the reserve is deleted and the write retried
in the room it held. Both happen under the vault's lock, so processes sharing the vault cannot race for it.
Sync code, like vault.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

SLACK = 64 * 1024
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def no_room(err: OSError) -> bool:
    """True when the write failed for lack of space (disk full or quota reached)."""
    return err.errno in NO_ROOM


class Reserve:
    """The reserve file of one vault."""

    def __init__(self, vault_path: Path) -> None:
        self.vault_path = vault_path
        self.path = vault_path.with_name(vault_path.name + ".reserve")

    def needed(self) -> int:
        """Room for one more vault write (a temp file beside the old one) twice over, plus SLACK."""
        try:
            size = os.stat(self.vault_path).st_size
        except FileNotFoundError:
            size = 0
        return 2 * size + SLACK

    def ensure(self) -> None:
        """Make sure the reserve holds enough allocated blocks; OSError (ENOSPC) when the disk has no room."""
        need = self.needed()
        try:
            if os.stat(self.path).st_size >= need:
                return
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        except PermissionError:  # left by another user (a root CLI run): the directory is ours, so is the name
            os.unlink(self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, need)  # blocks, not a sparse size: the room must really be ours
            os.fsync(fd)
        finally:
            os.close(fd)

    def release(self) -> bool:
        """Delete the reserve to free its room; False when there was none."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True
