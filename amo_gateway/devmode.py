"""`serve --sandbox`: with no real client secret, run against the built-in sandbox and say so loudly."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from amo_gateway.sandbox import SandboxAccount, SandboxConfig
from amo_gateway.settings import PREFIX, Settings

DEMO_LOGIN = "demo@example.com"
DEMO_API_KEY = "sandbox-api-key"  # a fake key the sandbox accepts; amoCRM never sees it
DEMO_ACCOUNT_ID = 31920194
DEV_SETTINGS = "dev-settings.json"  # beside the vault: what the CLI needs to work on `make run`'s vault
_SHARED = ("client_id", "domain", "redirect_uri", "base_url", "auth_url", "account_id", "vault_key_file")
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
    _write_dev_settings(workdir, dev)
    config = SandboxConfig(
        client_id=str(dev.client_id),
        client_secret=dev.secret("client_secret") or "",
        redirect_uri=str(dev.redirect_uri),
        accounts=[SandboxAccount(DEMO_ACCOUNT_ID, DEMO_SUBDOMAIN, {DEMO_LOGIN: DEMO_API_KEY}, set(), "Demo account")],
        send_referer=False,
    )
    return dev, config


def _write_dev_settings(workdir: Path, dev: Settings) -> None:
    """Leave the sandbox's non-secret settings beside the vault, so `amo-gateway status` etc. find them."""
    values = {name: getattr(dev, name) for name in _SHARED if getattr(dev, name) is not None}
    values["vault_key_file"] = str(Path(values["vault_key_file"]).resolve()) if "vault_key_file" in values else None
    path = workdir / DEV_SETTINGS
    path.write_text(json.dumps({k: v for k, v in values.items() if v is not None}, indent=2) + "\n", encoding="utf-8")
    path.chmod(0o600)


def with_dev_settings(settings: Settings) -> Settings:
    """The CLI beside `make run`: fill what is not configured from the sandbox's dev settings, if any.

    Only where no client secret is configured (a production set-up always has one) and only for settings
    left unset, so the environment and the config file still win.
    """
    path = settings.vault_path.parent / DEV_SETTINGS
    if settings.client_secret is not None or os.environ.get("CREDENTIALS_DIRECTORY") or not path.is_file():
        return settings
    try:
        dev: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return settings
    unset = {k: v for k, v in dev.items() if k in _SHARED and getattr(settings, k, None) is None}
    if "auth_url" in dev and settings.auth_url == Settings.model_fields["auth_url"].default:
        unset["auth_url"] = dev["auth_url"]
    if settings.vault_key is not None:
        unset.pop("vault_key_file", None)
    return Settings.model_validate(settings.model_dump() | unset) if unset else settings


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
