"""Connection bounds (connections.py): the cap, idle eviction, the first-request deadline, accept() errors."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import secrets
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.fernet import Fernet

from amo_gateway.connections import ACCEPT_FAILED, AcceptErrors, ConnectionGuard, GuardedRunner, descriptor_cap
from amo_gateway.edge import Edge
from amo_gateway.forwarded import TrustedProxyForwarded
from amo_gateway.settings import Settings
from tests.conftest import free_port
from tests.deploy_procs import ROOT, Process, port_open, wait_until

HEAD = b"GET /ok HTTP/1.1\r\nHost: gateway\r\n\r\n"


async def _serve(guard: ConnectionGuard, release: asyncio.Event) -> tuple[GuardedRunner, int]:
    """A small app behind the guard: /ok answers at once, /slow when `release` is set."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"status": "late"})

    edge = Edge(guard, TrustedProxyForwarded([]))
    app = web.Application()
    app.router.add_get("/ok", edge(ok))
    app.router.add_get("/slow", edge(slow))
    runner = GuardedRunner(app, guard, shutdown_timeout=1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.fixture
async def served() -> AsyncIterator[Any]:
    runners: list[GuardedRunner] = []
    release = asyncio.Event()

    async def start(guard: ConnectionGuard) -> int:
        runner, port = await _serve(guard, release)
        runners.append(runner)
        return port

    start.release = release  # type: ignore[attr-defined]
    yield start
    release.set()
    for runner in runners:
        await runner.cleanup()


async def _ask(port: int, head: bytes = HEAD) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """Open a connection, send `head`, return the status of the answer (the connection stays open)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    status_line = await asyncio.wait_for(reader.readline(), 3)
    return reader, writer, int(status_line.split()[1])


async def _closed(reader: asyncio.StreamReader, within: float) -> bool:
    """True when the server hangs up within `within` seconds (whatever it sends first is skipped)."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


async def test_idle_connections_are_evicted_to_make_room_under_the_cap(served: Any) -> None:
    """Cap 3, three idle sockets: a fourth caller is served, the oldest idle socket is closed."""
    guard = ConnectionGuard(cap=3, header_timeout=30)
    port = await served(guard)
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    await asyncio.sleep(0.1)
    _, writer, status = await _ask(port)
    assert status == 200
    assert await _closed(idle[0][0], within=1)
    assert not await _closed(idle[2][0], within=0.2)
    for _, w in [*idle, (None, writer)]:
        w.close()


async def test_over_the_cap_with_every_connection_busy_answers_503_json(served: Any) -> None:
    """Cap 2, both connections inside a request: the third gets 503 too_many_connections and is closed."""
    guard = ConnectionGuard(cap=2, header_timeout=30)
    port = await served(guard)
    busy = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: gateway\r\n\r\n")
        busy.append(writer)
    await asyncio.sleep(0.2)
    reader, writer, status = await _ask(port)
    assert status == 503
    body = (await reader.read()).split(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["error"] == "too_many_connections"
    served.release.set()
    for w in [*busy, writer]:
        w.close()


async def test_a_connection_without_a_request_head_is_closed_after_the_header_timeout(served: Any) -> None:
    """A silent socket and one that sends half a request line are both closed after the deadline."""
    guard = ConnectionGuard(cap=100, header_timeout=0.3)
    port = await served(guard)
    silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)
    partial_reader, partial = await asyncio.open_connection("127.0.0.1", port)
    partial.write(b"GET /ok HTTP/1.1\r\nHost: gate")
    started = time.monotonic()
    assert await _closed(silent_reader, within=3) and await _closed(partial_reader, within=3)
    assert 0.25 < time.monotonic() - started < 3
    silent.close()
    partial.close()


async def test_a_served_connection_stays_open_for_keep_alive(served: Any) -> None:
    """The deadline is for the first request only: a kept-alive connection outlives it."""
    guard = ConnectionGuard(cap=100, header_timeout=0.3)
    port = await served(guard)
    reader, writer, status = await _ask(port)
    assert status == 200
    await reader.readuntil(b'{"status": "ok"}')
    await asyncio.sleep(0.6)
    writer.write(HEAD)
    assert (await asyncio.wait_for(reader.readline(), 2)).split()[1] == b"200"
    writer.close()


async def test_accept_errors_are_logged_at_most_once_a_second_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    """500 failed accepts in a burst: one line at once, one line counting the rest after the interval."""
    loop = asyncio.get_running_loop()
    others: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: others.append(context))
    errors = AcceptErrors(loop, interval=0.2)
    errors.install()
    failed = {"message": ACCEPT_FAILED, "exception": OSError(errno.EMFILE, "Too many open files")}
    try:
        with caplog.at_level(logging.ERROR, logger="amo_gateway.connections"):
            for _ in range(500):
                loop.call_exception_handler(failed)
            loop.call_exception_handler({"message": "something else"})
            await asyncio.sleep(0.4)
    finally:
        errors.uninstall()
    lines = [r for r in caplog.records if r.getMessage() == "accept.failed"]
    assert [r.fields["count"] for r in lines] == [1, 499]  # type: ignore[attr-defined]
    assert lines[0].fields["error"] == "EMFILE"  # type: ignore[attr-defined]
    assert others == [{"message": "something else"}]


def test_the_cap_leaves_descriptors_for_the_vault_and_amocrm() -> None:
    """Under a 256-descriptor limit the cap is 64 at most, whatever AMO_MAX_CONNECTIONS says; under 8192, 1024 fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        assert descriptor_cap(1024) == 64
        assert descriptor_cap(10) == 10
        resource.setrlimit(resource.RLIMIT_NOFILE, (8192, hard))
        assert descriptor_cap(1024) == 1024
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


IDLE = 400
LIMIT = 256
HEADER_TIMEOUT = 2


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def _healthz(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        return int(sock.recv(4096).split()[1])


def _hung_up(socks: set[socket.socket]) -> set[socket.socket]:
    """Those of `socks` the server has closed (readable and at end of stream, or reset), waiting up to 0.2 s."""
    readable, _, _ = select.select(list(socks), [], [], 0.2)
    closed = set()
    for sock in readable:
        try:
            if sock.recv(4096) == b"":
                closed.add(sock)
        except ConnectionResetError:
            closed.add(sock)
    return closed


def test_more_idle_connections_than_descriptors_leave_healthz_answering(tmp_path: Path) -> None:
    """The real service under a 256-descriptor limit: 400 idle sockets, /healthz answers, every idle socket is
    closed (displaced or by the header deadline), and accept() errors, if any, are logged once a second."""
    port = free_port()
    env = {"AMO_CLIENT_ID": "client", "AMO_CLIENT_SECRET": secrets.token_hex(16), "AMO_ADMIN_TOKEN": "admin-x",
           "AMO_REDIRECT_URI": "http://127.0.0.1/cb", "AMO_BASE_URL": "http://127.0.0.1:9",
           "AMO_VAULT_KEY": Fernet.generate_key().decode(), "AMO_VAULT_PATH": str(tmp_path / "v" / "vault.enc"),
           "AMO_GATEWAY_PORT": str(port), "AMO_HEADER_TIMEOUT": str(HEADER_TIMEOUT), "AMO_LOG_LEVEL": "WARNING",
           "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        popen = subprocess.Popen([sys.executable, "-m", "amo_gateway", "serve"], stdout=out, stderr=subprocess.STDOUT,
                                 env=env, cwd=tmp_path, preexec_fn=_limit_descriptors)
    gateway = Process("gateway", popen, log)
    idle: list[socket.socket] = []
    try:
        wait_until("the gateway listens", lambda: port_open(port), 30, gateway)
        flood_started = time.monotonic()
        deadline = flood_started + 15
        while len(idle) < IDLE and time.monotonic() < deadline:
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            except OSError:
                continue
        assert _healthz(port) == 200  # within its 3 s socket timeout; before the guard it never came
        assert len(idle) == IDLE
        open_ = set(idle)
        deadline = time.monotonic() + HEADER_TIMEOUT + 8
        while open_ and time.monotonic() < deadline:
            open_ -= _hung_up(open_)
        assert not open_, f"{len(open_)} idle sockets still open past the header timeout"
        gateway.check_alive()
    finally:
        for sock in idle:
            sock.close()
        gateway.stop()
    # The cap keeps the process clear of its limit, except that asyncio may accept a burst or two of sockets
    # before the idle ones it displaces give their descriptors back; then the error is said once a second.
    failures = [json.loads(line) for line in gateway.output().splitlines() if "accept.failed" in line]
    assert len(failures) <= time.monotonic() - flood_started + 1
    assert all(line["count"] >= 1 for line in failures)


def test_the_unit_gives_the_default_cap_its_descriptors() -> None:
    """systemd's LimitNOFILE leaves room for AMO_MAX_CONNECTIONS' default after the descriptor reserve."""
    unit = (ROOT / "systemd" / "amo-gateway.service").read_text(encoding="utf-8")
    limits = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("LimitNOFILE=")]
    assert len(limits) == 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(limits[0]), max(hard, int(limits[0]))))
    try:
        assert descriptor_cap(Settings().max_connections) == Settings().max_connections
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
