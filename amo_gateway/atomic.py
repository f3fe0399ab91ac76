"""One durable file write: a temp file beside the target, fsync, os.replace, then fsync of the directory.

Used by the vault and the alert outbox, whose contents must be whole after any crash: a reader sees the old
file or the new one, never a mix, and a completed write survives a power cut.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, blob: bytes, temp_tag: str) -> None:
    """Replace `path` with `blob` (mode 0600); the temp file is `<name><temp_tag><pid>-<random>`, removed on error."""
    tmp = path.with_name(f"{path.name}{temp_tag}{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
