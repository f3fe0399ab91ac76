"""The test rig: a real sandbox and a real gateway, each on its own loopback socket."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet

from amo_gateway.app import create_app
from amo_gateway.sandbox import (
    SANDBOX_STATE,
    SandboxAccount,
    SandboxConfig,
    SandboxState,
    create_sandbox_app,
)
from amo_gateway.serve import runner_options
from amo_gateway.settings import PREFIX, Settings
from amo_gateway.typedefs import ACCESS_LOG
from amo_gateway.vault import KeyRing, Vault
from tests.pg import PgVaultView, ThrowawayPostgres, throwaway_postgres

LOGIN = "demo@example.com"
API_KEY = "sandbox-api-key-for-tests"
ACCOUNT_ID = 31920194
# The quick model run's seed (tests/test_model.py): random each run, printed in the header, replayable.
MODEL_SEED = int(os.environ.get("AMO_MODEL_SEED") or random.SystemRandom().randrange(2**32))


def pytest_report_header() -> str:
    return f"model seed: {MODEL_SEED} (replay with AMO_MODEL_SEED={MODEL_SEED})"


class FakeClock:
    """Time that moves only when a test says so; sleepers wake when it passes their deadline."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self._changed = asyncio.Event()

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        deadline = self.now + seconds
        while self.now < deadline:
            self._changed.clear()
            await self._changed.wait()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self._changed.set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Rig:
    """A gateway wired to a sandbox, plus handles on both for assertions."""

    client: TestClient[web.Request, web.Application]
    app: web.Application
    sandbox: SandboxState
    sandbox_url: str
    settings: Settings
    keys: KeyRing
    admin: dict[str, str] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"{PREFIX}{path}"

    def vault(self) -> Vault:
        """The stored state as a Vault (the file, or with AMO_DATABASE_URL the database seen alike)."""
        url = self.settings.secret("database_url")
        return PgVaultView(url, self.keys) if url else Vault(self.settings.vault_path, self.keys)  # type: ignore[return-value]

    async def connect(self) -> dict[str, Any]:
        """The seed's story: exchange, amoCRM's own callback arrives, the pair is stored."""
        resp = await self.client.post(self.url("/exchange-api-key"), json={"login": LOGIN, "api_key": API_KEY},
                                      headers=self.admin)
        assert resp.status == 202, await resp.text()
        return await self.callback_answer()

    async def callback_answer(self) -> dict[str, Any]:
        """Wait for amoCRM's (the sandbox's) server-to-server callback to be answered; return its record."""
        for _ in range(250):
            done = [c for c in self.sandbox.callbacks if c["status"] is not None or c["error"] is not None]
            if done:
                return dict(done[-1])
            await asyncio.sleep(0.02)
        raise AssertionError("the sandbox's callback was never answered")


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture(scope="session")
def postgres_server() -> Any:
    """One throwaway PostgreSQL for the whole session (tests/pg.py), or why there is none."""
    with throwaway_postgres() as server:
        yield server


@pytest.fixture
def postgres(postgres_server: ThrowawayPostgres | str) -> ThrowawayPostgres:
    """The running server; without one the test skips, except under CI=true where it fails loudly."""
    if isinstance(postgres_server, str):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs a real PostgreSQL: {postgres_server}")
        pytest.skip(postgres_server)
    return postgres_server


@pytest.fixture
def database_url(postgres: ThrowawayPostgres) -> str:
    """A fresh, empty database of the session's server."""
    return postgres.database()


@pytest.fixture
def keys() -> KeyRing:
    return KeyRing([Fernet.generate_key().decode()])


@pytest.fixture
async def make_rig(tmp_path: Path, keys: KeyRing, aiohttp_client: Any, request: pytest.FixtureRequest) -> RigFactory:
    """Build a rig; keyword arguments override gateway settings, `sandbox_*` ones the sandbox config.

    AMO_TEST_BACKEND=postgres runs every rig on a fresh PostgreSQL database instead of the vault file (tests
    that read the vault file themselves then fail for that reason, not for the gateway's behaviour).
    """

    async def build(*, clock: Any = None, run_refresher: bool = True, resolver: Any = None, **overrides: Any) -> Rig:
        if os.environ.get("AMO_TEST_BACKEND") == "postgres" and "database_url" not in overrides:
            shared.append(shared[0] if shared else request.getfixturevalue("postgres").database())
            overrides["database_url"] = shared[0]  # one database per test: a "restarted" rig finds its state
        sandbox_opts = {k[len("sandbox_"):]: overrides.pop(k) for k in list(overrides) if k.startswith("sandbox_")}
        port = free_port()
        redirect = f"http://127.0.0.1:{port}{PREFIX}/callback"
        client_id, client_secret = "2912780f-a1e4-4d5d-a069-ee01422d8bef", secrets.token_hex(32)
        config = SandboxConfig(
            client_id=client_id, client_secret=client_secret, redirect_uri=redirect,
            accounts=sandbox_opts.pop("accounts", None)
            or [SandboxAccount(ACCOUNT_ID, "demo", {LOGIN: API_KEY}, {"viewer@example.com"}, "Demo")],
            send_referer=False, **({"clock": clock.time} if clock else {}), **sandbox_opts,
        )
        sandbox_app = create_sandbox_app(config)
        sandbox_server = TestServer(sandbox_app, host="127.0.0.1")
        await sandbox_server.start_server()
        sandbox_url = f"http://127.0.0.1:{sandbox_server.port}"
        admin_token = secrets.token_urlsafe(16)
        values: dict[str, Any] = {
            "client_id": client_id, "client_secret": client_secret, "redirect_uri": redirect,
            "base_url": sandbox_url, "admin_token": admin_token, "vault_path": tmp_path / "vault" / "vault.enc",
            "consumer_tokens": "crm-sync:consumer-secret-1,reports:consumer-secret-2",
            "test_cache_seconds": 0, "shutdown_timeout": 5,
        }
        values.update({k: (v.format(sandbox_port=sandbox_server.port) if isinstance(v, str) else v)
                       for k, v in overrides.items()})
        settings = Settings.model_validate(values)
        app = create_app(settings, clock=clock, keys=keys, run_refresher=run_refresher, resolver=resolver)
        server = TestServer(app, host="127.0.0.1", port=port)
        await server.start_server(**runner_options(settings, app[ACCESS_LOG]))  # the service's access log, timeouts
        client = await aiohttp_client(server)
        rig = Rig(client, app, sandbox_app[SANDBOX_STATE], sandbox_url, settings, keys,
                  {"Authorization": f"Bearer {admin_token}"})
        cleanups.append(sandbox_server.close)
        return rig

    cleanups: list[Callable[[], Awaitable[None]]] = []
    shared: list[str] = []
    yield build  # type: ignore[misc]
    for close in cleanups:
        await close()


@pytest.fixture
async def rig(make_rig: RigFactory) -> Rig:
    return await make_rig()
