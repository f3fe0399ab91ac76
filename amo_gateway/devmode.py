"""`serve --sandbox`: with no real client secret, run against the built-in sandbox and say so loudly."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from cryptography.fernet import Fernet

from amo_gateway.sandbox import SandboxAccount, SandboxConfig
from amo_gateway.settings import PREFIX, Settings

DEMO_LOGIN = "demo@example.com"
DEMO_API_KEY = "sandbox-api-key"  # a fake key the sandbox accepts; amoCRM never sees it
DEMO_ACCOUNT_ID = 31920194
DEMO_SUBDOMAIN = "demo"  # the sandbox account's subdomain everywhere: /accounts, /test, the per-account URL


def sandbox_setup(settings: Settings, workdir: Path) -> tuple[Settings, SandboxConfig]:
    """Settings pointed at a sandbox on port+1, with local dev credentials created under `workdir`."""
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    public = f"http://{settings.host}:{settings.port}"
    sandbox_port = settings.port + 1
    changes = {
        "client_id": settings.client_id or "2912780f-a1e4-4d5d-a069-ee01422d8bef",
        "client_secret": secrets.token_hex(32),
        "redirect_uri": f"{public}{PREFIX}/callback",
        # The sandbox account's name (so /accounts and /test both say `demo`), reached on the loopback port.
        "domain": f"{DEMO_SUBDOMAIN}.amocrm.ru",
        "base_url": f"http://127.0.0.1:{sandbox_port}",
        "auth_url": f"http://127.0.0.1:{sandbox_port}/oauth",
        "account_id": DEMO_ACCOUNT_ID,
        "admin_token": settings.secret("admin_token") or _dev_file(workdir / "admin-token", secrets.token_urlsafe(24)),
    }
    if settings.vault_key_file is None and settings.vault_key is None:
        changes["vault_key_file"] = workdir / "vault-key"
        _dev_file(workdir / "vault-key", Fernet.generate_key().decode())
    dev = Settings.model_validate(settings.model_dump() | changes)
    config = SandboxConfig(
        client_id=str(dev.client_id),
        client_secret=dev.secret("client_secret") or "",
        redirect_uri=str(dev.redirect_uri),
        accounts=[SandboxAccount(DEMO_ACCOUNT_ID, DEMO_SUBDOMAIN, {DEMO_LOGIN: DEMO_API_KEY}, set(), "Demo account")],
        send_referer=False,
    )
    return dev, config


def _dev_file(path: Path, value: str) -> str:
    """Read a local dev credential, creating it (0600) on first use."""
    if not path.exists():
        path.write_text(value + "\n", encoding="utf-8")
        path.chmod(0o600)
    return path.read_text(encoding="utf-8").strip()


def banner(settings: Settings, workdir: Path) -> None:
    """The loud start-up notice of sandbox mode."""
    lines = [
        "=" * 72,
        "  SANDBOX MODE: no AMO_CLIENT_SECRET configured, so amo-gateway talks to its",
        f"  built-in amoCRM stand-in at {settings.account_base_url}. Nothing here reaches amoCRM.",
        f"  sandbox login:   {DEMO_LOGIN}",
        f"  sandbox api_key: {DEMO_API_KEY}",
        f"  operator token:  in {workdir / 'admin-token'}  (Authorization: Bearer $(cat {workdir}/admin-token))",
        f"  gateway:         http://{settings.host}:{settings.port}{PREFIX}/",
        "  The sandbox forgets its tokens when it stops: after a restart, /test says",
        f"  reauth_required; `make clean-dev` (or rm {workdir}/vault.enc*) starts afresh.",
        "=" * 72,
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
