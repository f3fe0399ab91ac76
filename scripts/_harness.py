"""Shared rig for the evidence scripts: a standalone sandbox and real gateway processes on loopback.

Everything runs as separate OS processes (`python -m amo_gateway.sandbox`, `amo-gateway serve`) so that
SIGKILL, several processes on one vault and memory sampling are real. Secrets are generated per run and
never printed; the harness talks to the sandbox's control endpoints for counters and fault switches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amo_gateway.settings import PREFIX  # noqa: E402 - the path above makes the package importable
from amo_gateway.tokens import VaultData, fingerprint  # noqa: E402
from amo_gateway.vault import KeyRing, Vault  # noqa: E402

LOGIN = "demo@example.com"
API_KEY = "sandbox-api-key"
ACCOUNT_ID = "31920194"
CONSUMER = "soak:consumer-secret-for-soak"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


def report(result: dict[str, Any], path: Path | None) -> int:
    """Print the figures, write them to `path` as JSON when asked; exit status 1 when anything failed."""
    text = json.dumps(result, indent=2)
    print(text)
    if path is not None:
        path.write_text(text)
    return 0 if not result["failures"] else 1


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_command() -> list[str]:
    """The venv's `amo-gateway serve`, or `python -m amo_gateway serve` when the script is missing."""
    script = Path(sys.executable).parent / "amo-gateway"
    return [str(script), "serve"] if script.exists() else [sys.executable, "-m", "amo_gateway", "serve"]


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB, from /proc/<pid>/status (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


@dataclass
class Harness:
    """One sandbox and N gateway processes sharing one vault under `workdir`."""

    workdir: Path
    access_ttl: int = 3
    gateways: int = 1
    refresh_margin: int = 3600
    extra_env: dict[str, str] = field(default_factory=dict)
    client_id: str = "2912780f-a1e4-4d5d-a069-ee01422d8bef"
    client_secret: str = field(default_factory=lambda: secrets.token_hex(32))
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    sandbox_port: int = field(default_factory=free_port)
    ports: list[int] = field(default_factory=list)
    procs: dict[int, asyncio.subprocess.Process] = field(default_factory=dict)
    sandbox: asyncio.subprocess.Process | None = None
    session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = self.ports or [free_port() for _ in range(self.gateways)]
        self.key_file = self.workdir / "vault.key"
        self.key_file.write_text(Fernet.generate_key().decode() + "\n")
        self.key_file.chmod(0o600)
        self.vault_path = self.workdir / "vault" / "vault.enc"
        self.redirect_uri = f"http://127.0.0.1:{self.ports[0]}{PREFIX}/callback"

    # Lifetimes.
    async def __aenter__(self) -> Harness:
        self.session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT)
        await self.start_sandbox()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for index in list(self.procs):
            await self.stop(index)
        if self.sandbox is not None:
            await _terminate(self.sandbox)
        if self.session is not None:
            await self.session.close()

    async def start_sandbox(self) -> None:
        """The standalone sandbox, short-lived access tokens, no exchange interval, no referer."""
        log = (self.workdir / "sandbox.log").open("ab")
        self.sandbox = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "amo_gateway.sandbox", "--port", str(self.sandbox_port),
            "--client-id", self.client_id, "--client-secret", self.client_secret,
            "--redirect-uri", self.redirect_uri, "--access-ttl", str(self.access_ttl),
            "--exchange-interval", "0", "--no-referer", "--api-key", API_KEY, "--login", LOGIN,
            "--callback-delay", "0.01", stdout=log, stderr=log, cwd=ROOT)
        log.close()
        await self._wait_http(f"{self.sandbox_url}/_sandbox/stats")

    def env(self, index: int) -> dict[str, str]:
        """The environment of gateway `index` (its port; everything else shared)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AMO_")}
        env.update({
            "AMO_CLIENT_ID": self.client_id, "AMO_CLIENT_SECRET": self.client_secret,
            "AMO_REDIRECT_URI": self.redirect_uri, "AMO_BASE_URL": self.sandbox_url,
            "AMO_ADMIN_TOKEN": self.admin_token, "AMO_VAULT_PATH": str(self.vault_path),
            "AMO_VAULT_KEY_FILE": str(self.key_file), "AMO_GATEWAY_PORT": str(self.ports[index]),
            "AMO_REFRESH_MARGIN": str(self.refresh_margin), "AMO_EXCHANGE_INTERVAL": "0",
            "AMO_CONSUMER_TOKENS": CONSUMER, "AMO_UPSTREAM_TIMEOUT": "5", "AMO_SHUTDOWN_TIMEOUT": "5",
            "AMO_LOG_LEVEL": "WARNING",
        })
        # This checkout's code, even when the venv's editable install points at another one (a git worktree).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env.update(self.extra_env)
        return env

    async def start(self, index: int = 0) -> asyncio.subprocess.Process:
        """Start gateway `index` and wait until it answers HTTP."""
        log = (self.workdir / f"gateway-{index}.log").open("ab")
        proc = await asyncio.create_subprocess_exec(*gateway_command(), env=self.env(index), stdout=log,
                                                    stderr=log, cwd=self.workdir)
        log.close()
        self.procs[index] = proc
        try:
            await self._wait_http(self.url(index, "/token"), proc=proc)
        except RuntimeError as err:
            tail = (self.workdir / f"gateway-{index}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{err}; its log ends with:\n{tail}") from None
        return proc

    async def kill(self, index: int = 0) -> None:
        """SIGKILL gateway `index`: no cleanup, no drain, exactly like a power cut for the process."""
        proc = self.procs.pop(index)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await proc.wait()

    async def stop(self, index: int = 0) -> None:
        """SIGTERM gateway `index` and wait for its graceful exit (SIGKILL after a bound)."""
        await _terminate(self.procs.pop(index))

    # HTTP.
    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}"

    def url(self, index: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[index]}{PREFIX}{path}"

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    async def get_json(self, url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """GET and decode; a body that is not JSON comes back as text."""
        assert self.session is not None
        async with self.session.get(url, headers=headers) as resp:
            text = await resp.text()
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, text

    async def token(self, index: int = 0) -> tuple[int, Any]:
        return await self.get_json(self.url(index, "/token"), self.admin)

    async def refreshed(self, index: int) -> int:
        """How many refreshes gateway `index` itself completed, from its own /metrics."""
        assert self.session is not None
        url = f"http://127.0.0.1:{self.ports[index]}/metrics"
        async with self.session.get(url, headers=self.admin) as resp:
            text = await resp.text()
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("amo_gateway_refreshes_total{") and 'outcome="refreshed"' in line)

    async def stats(self) -> dict[str, Any]:
        status, body = await self.get_json(f"{self.sandbox_url}/_sandbox/stats")
        assert status == 200, body
        return dict(body)

    async def faults(self, **switches: Any) -> None:
        """Set the sandbox's test switches (fail_next, delay, drop_next_refresh, clear)."""
        assert self.session is not None
        async with self.session.post(f"{self.sandbox_url}/_sandbox/faults", json=switches) as resp:
            assert resp.status == 200, await resp.text()

    async def post_sandbox(self, path: str, body: dict[str, Any]) -> Any:
        """POST to one of the sandbox's control endpoints (`/_sandbox/revoke`, ...); its JSON answer."""
        assert self.session is not None
        async with self.session.post(f"{self.sandbox_url}{path}", json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def is_live(self, refresh_token: str | None) -> bool:
        """Whether the sandbox still accepts this refresh token, asked without spending it."""
        if not refresh_token:
            return False
        status, _ = await self.get_json(f"{self.sandbox_url}/oauth2/account/current/subdomain",
                                        {"X-Refresh-Token": refresh_token})
        return status == 200

    async def connect(self, index: int = 0) -> None:
        """The seed's story: exchange, then wait until the sandbox's callback was answered 200."""
        assert self.session is not None
        before = len((await self.stats())["callbacks"])
        async with self.session.post(self.url(index, "/exchange-api-key"), headers=self.admin,
                                     json={"login": LOGIN, "api_key": API_KEY}) as resp:
            assert resp.status == 202, await resp.text()
        for _ in range(300):
            callbacks = (await self.stats())["callbacks"][before:]
            done = [c for c in callbacks if c["status"] is not None or c["error"] is not None]
            if done:
                assert done[-1]["status"] == 200, done[-1]
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the sandbox's callback was never answered")

    # The vault, read exactly as a crash left it.
    def read_vault(self) -> VaultData:
        """Decrypt the vault without its lock (a writer may be frozen holding it); replace() keeps it whole."""
        return Vault(self.vault_path, KeyRing.parse(self.key_file.read_text())).load()

    def vault_refresh(self) -> tuple[str | None, str | None, str]:
        """(refresh token, its in-flight marker fingerprint, status[: reason]) of the account, as stored."""
        account = self.read_vault().accounts.get(ACCOUNT_ID)
        if account is None or account.tokens is None:
            return None, None, "absent"
        marker = account.in_flight.refresh_fp if account.in_flight else None
        status = f"{account.status}: {account.reason}" if account.reason else account.status
        return account.tokens.refresh_token, marker, status

    async def _wait_http(self, url: str, *, proc: asyncio.subprocess.Process | None = None,
                         limit: float = 20.0) -> None:
        """Poll until the URL answers anything; fail early when the process died."""
        assert self.session is not None
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if proc is not None and proc.returncode is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before serving {url}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    await resp.read()
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"nothing answered at {url} within {limit} s")


async def _terminate(proc: asyncio.subprocess.Process, grace: float = 8.0) -> None:
    """SIGTERM, then SIGKILL when the process outlives the grace period."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def poll(done: Callable[[], Awaitable[bool]], limit: float, interval: float = 0.005) -> bool:
    """Check `done` every `interval` seconds until it is true (True) or `limit` seconds pass (False)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:  # the condition lives in another process: polling, not an Event
        if await done():
            return True
        await asyncio.sleep(interval)
    return False


def fp(token: str | None) -> str:
    """The fingerprint the gateway's in-flight marker uses."""
    return fingerprint(token)


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most arrivals in any `window`-second span (half-open, as the sandbox's own limiter counts)."""
    ordered, best, start = sorted(times), 0, 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best
