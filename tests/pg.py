"""A throwaway PostgreSQL for the tests: Debian's server binaries, `initdb` in a temp dir, a free loopback port.

Never the machine's own cluster and nothing under /etc: the data directory, the socket and the log live in
one temporary directory removed afterwards. PostgreSQL refuses to run as root, so under root the server runs
as `nobody` (the temp dir is handed to it). Authentication is `trust` on 127.0.0.1 only, for a server that
lives as long as the test session. `make test` installs the package when missing (scripts/ensure-postgresql.sh);
without it the PostgreSQL tests skip, except under CI=true, where a missing server fails the run loudly.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from amo_gateway.backends.pg_schema import Sealer
from amo_gateway.backends.postgres import _UPSERT_ACCOUNT, _UPSERT_SLOT, _UPSERT_STATE, CHANNEL
from amo_gateway.tokens import Account, PendingState, VaultData
from amo_gateway.vault import KeyRing, Unchanged

_WATCHDOG = """
import json, os, shutil, subprocess, sys, time
owner, root, stop = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
while os.path.isdir(root):
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        subprocess.run(stop, capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)
        break
    time.sleep(1)
"""


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
        # AMO_TEST_PG_DIR: where scripts/mutation.py finds the servers of test runs it killed on a timeout
        self.root = Path(tempfile.mkdtemp(prefix="amo-pg-", dir=os.environ.get("AMO_TEST_PG_DIR")))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_nobody = os.geteuid() == 0
        self._watchdogs: list[subprocess.Popen[bytes]] = []

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
        self._watch()

    def _watch(self) -> None:
        """A watchdog that stops the server and removes its directory once this process is gone.

        pg_ctl detaches the server, so a test process killed before `destroy` (a timeout, a SIGKILL, a mutation
        run killing a hung mutant) would leave it running for good; the watchdog sees the owner die and cleans up.
        It also ends by itself when `destroy` has removed the directory.
        """
        pg_ctl = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]
        if self._as_nobody:
            pg_ctl = ["runuser", "-u", "nobody", "--", *pg_ctl]
        self._watchdogs.append(subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.root), json.dumps(pg_ctl)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)
        for watchdog in self._watchdogs:  # nothing left to watch
            watchdog.kill()
            watchdog.wait()
        self._watchdogs.clear()

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


class PgVaultView:
    """The database seen the way tests written for the file see the vault: `read`, `load`, `update`, blocking.

    Lets the whole suite run on PostgreSQL (AMO_TEST_BACKEND=postgres): an update locks the tables, runs the
    change over everything, writes the difference and tells the gateways (NOTIFY) to re-read.
    """

    def __init__(self, url: str, keys: KeyRing) -> None:
        self.url = url
        self.keys = keys
        self._sealer = Sealer(keys, None)

    def read(self) -> tuple[VaultData, None]:
        return self.load(), None

    def load(self) -> VaultData:
        with psycopg.connect(self.url) as conn:
            return self._load(conn)

    def update(self, change: Callable[[VaultData], Any]) -> tuple[Any, VaultData, None]:
        with psycopg.connect(self.url) as conn, conn.transaction():
            conn.execute("LOCK TABLE amo_accounts, amo_states, amo_exchange_slots IN EXCLUSIVE MODE")
            data = self._load(conn)
            before = data.copy()
            result = change(data)
            if isinstance(result, Unchanged):
                return result.value, data, None
            self._write(conn, before, data)
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps({"w": "tests", "all": True})))
        return result, data, None

    def _load(self, conn: psycopg.Connection[Any]) -> VaultData:
        accounts = conn.execute("SELECT account_id, sealed, key_fp FROM amo_accounts").fetchall()
        states = conn.execute("SELECT state_key, sealed, key_fp FROM amo_states").fetchall()
        slots = conn.execute("SELECT slot, until FROM amo_exchange_slots").fetchall()
        return VaultData(accounts={r[0]: Account.from_dict(self._sealer.open(r[1], r[2])) for r in accounts},
                         states={r[0]: PendingState(**self._sealer.open(r[1], r[2])) for r in states},
                         exchange_slots={r[0]: float(r[1]) for r in slots})

    def _write(self, conn: psycopg.Connection[Any], before: VaultData, after: VaultData) -> None:
        with conn.cursor() as cur:
            cur.executemany(_UPSERT_ACCOUNT, [(k, *self._sealer.seal(a.to_dict())) for k, a in after.accounts.items()
                                              if before.accounts.get(k) is not a])
            cur.executemany(_UPSERT_STATE, [(k, *self._sealer.seal(dict(vars(s))), s.expires_at)
                                            for k, s in after.states.items() if before.states.get(k) != s])
            cur.executemany(_UPSERT_SLOT, [(k, t) for k, t in after.exchange_slots.items()
                                           if before.exchange_slots.get(k) != t])
        for table, key, old, new in (("amo_accounts", "account_id", before.accounts, after.accounts),
                                     ("amo_states", "state_key", before.states, after.states),
                                     ("amo_exchange_slots", "slot", before.exchange_slots, after.exchange_slots)):
            gone = [k for k in old if k not in new]
            if gone:
                query = sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(sql.Identifier(table), sql.Identifier(key))
                conn.execute(query, (gone,))
