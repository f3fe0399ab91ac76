"""The operator's CLI beside `make run`: no exports needed, and every task (status, audit, forget, reconnect)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from amo_gateway.settings import PREFIX
from tests.conftest import free_port


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AMO_") and k != "CREDENTIALS_DIRECTORY"}


def _cli(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "amo_gateway", *args], capture_output=True, text=True, cwd=cwd,
                          env=_env(), input=stdin, timeout=30, check=False)


def _get(url: str, token: str | None = None, body: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")  # noqa: S310 - loopback
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 - a loopback URL the test built
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextlib.contextmanager
def _make_run(cwd: Path) -> Iterator[int]:
    """`make run`'s command in a fresh directory: sandbox mode, default settings, its own var/."""
    port = free_port()
    while True:  # the sandbox takes port + 1
        with contextlib.suppress(OSError):
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 1))
            break
        port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "amo_gateway", "serve", "--sandbox", "--port", str(port)],
                            cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                break
            time.sleep(0.05)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


@pytest.mark.slow
def test_the_cli_beside_make_run_needs_no_exports(tmp_path: Path) -> None:
    """status, authorize-url, audit, forget and reconnect find var/'s key and the sandbox settings by themselves."""
    with _make_run(tmp_path) as port:
        status = _cli(tmp_path, "status")
        assert (status.returncode, status.stdout.strip()) == (0, "no account connected"), status.stderr
        url = _cli(tmp_path, "authorize-url")
        assert url.returncode == 0, url.stderr
        assert url.stdout.startswith(f"http://127.0.0.1:{port + 1}/oauth?client_id=")
        empty = _cli(tmp_path, "audit")
        assert empty.returncode == 0 and "the audit log is empty" in empty.stderr

        admin = (tmp_path / "var" / "admin-token").read_text().strip()
        code, _ = _get(f"http://127.0.0.1:{port}{PREFIX}/exchange-api-key", admin,
                       {"login": "demo@example.com", "api_key": "sandbox-api-key"})
        assert code == 202
        for _ in range(100):
            if "connected" in _cli(tmp_path, "status").stdout:
                break
            time.sleep(0.05)
        rows = json.loads(_cli(tmp_path, "status", "--json").stdout)
        assert [(r["account_id"], r["subdomain"], r["state"]) for r in rows] == [("31920194", "demo", "connected")]

        refused = _cli(tmp_path, "forget", "31920194")  # no terminal to ask on: refuses rather than guess
        assert refused.returncode == 2 and "--yes" in refused.stderr
        forgot = _cli(tmp_path, "forget", "31920194", "--yes")
        assert forgot.returncode == 0, forgot.stderr
        assert _cli(tmp_path, "status").stdout.strip() == "no account connected"
        trail = _cli(tmp_path, "audit").stdout
        assert "account.forgotten" in trail and admin not in trail

        again = _cli(tmp_path, "reconnect")
        assert again.returncode == 0, again.stderr
        assert f"http://127.0.0.1:{port + 1}/oauth?client_id=" in again.stdout
        assert "exchange-api-key" in again.stdout and "5 minutes" in again.stdout


def test_every_flag_has_help_text() -> None:
    """`--help` of every command documents every option it takes."""
    from amo_gateway.cli import _parser

    parser = _parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():  # type: ignore[attr-defined]
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"`amo-gateway {name}` option {action.option_strings or action.dest} has no help"
