"""A throwaway PostgreSQL for the tests: Debian's server binaries, `initdb` in a temp dir, a free loopback port.

Never the machine's own cluster and nothing under /etc: the data directory, the socket and the log live in
one temporary directory removed afterwards. PostgreSQL refuses to run as root, so under root the server runs
as `nobody` (the temp dir is handed to it). Authentication is `trust` on 127.0.0.1 only, for a server that
lives as long as the test session. `make test` installs the package when missing (scripts/ensure-postgresql.sh);
without it the PostgreSQL tests skip, except under CI=true, where a missing server fails the run loudly.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg


def _bindir() -> Path | None:
    """Debian's versioned server directory (the newest), else wherever `initdb` is on PATH.

    AMO_TEST_POSTGRES=absent pretends there is none (how the CI=true failure is itself tested).
    """
    if os.environ.get("AMO_TEST_POSTGRES") == "absent":
        return None
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThrowawayPostgres:
    """One server for the session; `database()` hands each test a fresh, empty database."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="amo-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_nobody = os.geteuid() == 0

    @property
    def admin_url(self) -> str:
        return f"postgresql://amo@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self._as_nobody:
            command = ["runuser", "-u", "nobody", "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=self.root)

    def init(self) -> None:
        if self._as_nobody:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        self.root.chmod(0o700)
        self._run("initdb", "-D", str(self.data), "-U", "amo", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)

    def database(self) -> str:
        """A new empty database; its URL."""
        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
        return f"postgresql://amo@127.0.0.1:{self.port}/{name}"


@contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres | str]:
    """The running server, or why there is none (a string: the tests skip with it, or fail under CI)."""
    bindir = _bindir()
    if bindir is None:
        yield "PostgreSQL server binaries not found (apt-get install postgresql, or make test installs it)"
        return
    server = ThrowawayPostgres(bindir)
    try:
        server.init()
        yield server
    finally:
        server.destroy()
