"""The `amo-gateway` command: serve, and the operator's tools that work on the same vault."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet

from amo_gateway import logs
from amo_gateway.accounts import (
    account_subdomain,
    account_summary,
    account_url,
    amo_subdomain,
    configured_hosts,
    host_of,
)
from amo_gateway.errors import ConfigError, GatewayError
from amo_gateway.settings import Settings, load_settings
from amo_gateway.tokens import Account, TokenPair, VaultData, decode_claims
from amo_gateway.vault import KeyRing, Vault, load_keyring, write_key_file

if TYPE_CHECKING:
    from amo_gateway.backends.base import StateStore


def main(argv: list[str] | None = None) -> int:
    """Entry point; every known failure prints one line naming the cause and exits 2."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GatewayError as err:
        print(f"amo-gateway: error: {err.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amo-gateway", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="YAML settings file (environment and flags override it)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common], help="run the gateway")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1; AMO_GATEWAY_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080; AMO_GATEWAY_PORT); "
                                                "in sandbox mode the sandbox takes the next port")
    serve.add_argument("--vault-path", type=Path, help="the encrypted vault file (default var/vault.enc; "
                                                        "AMO_VAULT_PATH)")
    serve.add_argument("--sandbox", action="store_true",
                       help="with no AMO_CLIENT_SECRET, run against the built-in amoCRM sandbox (development)")
    serve.set_defaults(func=_serve)
    sub.add_parser("gen-key", help="print a new Fernet vault key").set_defaults(func=_gen_key)
    rotate = sub.add_parser("rotate-key", parents=[common], help="re-encrypt the vault under a new primary key")
    rotate.add_argument("--key-file", type=Path, help="the key file to rewrite (default: AMO_VAULT_KEY_FILE)")
    rotate.add_argument("--drop-old", action="store_true",
                        help="once the vault is re-encrypted, keep only the new key (backups made under the old "
                             "keys no longer open: re-copy the key file to the off-site copy)")
    rotate.set_defaults(func=_rotate_key)
    move = sub.add_parser("migrate-state", parents=[common], help="copy the shared state between the vault file "
                                                                  "and PostgreSQL (idempotent, deletes nothing)")
    move.add_argument("--to", required=True, metavar="TARGET",
                      help="postgresql://user@host:port/database (from the vault file) or file:PATH "
                           "(from the database of AMO_DATABASE_URL)")
    move.set_defaults(func=_migrate_state)
    restore = sub.add_parser("restore", parents=[common],
                             help="put a vault backup back; every refresh token in it is verified with amoCRM at once")
    restore.add_argument("backup", help="the backup file (a copy of vault.enc), or - to read it from standard input")
    restore.set_defaults(func=_restore)
    sub.add_parser("reencrypt", parents=[common],
                   help="re-encrypt the vault under the first key of the configured key ring "
                        "(amo-gateway-ctl rotate-key runs it as the service user)").set_defaults(func=_reencrypt)
    url = sub.add_parser("authorize-url", parents=[common], help="print a consent-page URL with a fresh state")
    url.add_argument("--label", help="a note kept beside the state")
    url.set_defaults(func=_authorize_url)
    audit = sub.add_parser("audit", parents=[common], help="show the audit trail (beside the vault or in the database)")
    audit.add_argument("--tail", type=int, metavar="N", help="only the last N events")
    audit.add_argument("--json", action="store_true", help="the stored JSON lines, unchanged")
    audit.set_defaults(func=_audit)
    status = sub.add_parser("status", parents=[common], help="the connected accounts, read from the vault")
    status.add_argument("--json", action="store_true", help="one JSON object per account instead of a table")
    status.set_defaults(func=_status)
    forget = sub.add_parser("forget", parents=[common], help="remove an account and its tokens from the vault")
    forget.add_argument("account", help="the amoCRM account id or subdomain to forget")
    forget.add_argument("--yes", action="store_true", help="do it without asking (scripts, amo-gateway-ctl)")
    forget.set_defaults(func=_forget)
    reconnect = sub.add_parser("reconnect", parents=[common],
                               help="print how to re-authorize an account: a consent URL and the API-key route")
    reconnect.add_argument("--label", help="a note kept beside the consent URL's state (shown in the audit)")
    reconnect.set_defaults(func=_reconnect)
    imp = sub.add_parser("import-token", parents=[common], help="store a long-lived token (private integrations)")
    imp.add_argument("token_file", help="file holding the token, or - to read it from standard input")
    imp.add_argument("--account-id", help="default: the token's account_id claim")
    imp.add_argument("--host", help="account host, e.g. acme.amocrm.ru (default: AMO_DOMAIN / AMO_BASE_URL)")
    imp.set_defaults(func=_import_token)
    return parser


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    """The settings, completed from `make run`'s sandbox settings when the tool runs beside it (devmode)."""
    from amo_gateway.devmode import with_dev_settings

    settings = load_settings(args.config, overrides=overrides)
    return settings if args.command == "serve" else with_dev_settings(settings)


def _vault(settings: Settings) -> Vault:
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    vault = Vault(settings.vault_path, load_keyring(settings.vault_key_file, credentials, settings.secret("vault_key")))
    vault.prepare()
    return vault


def _serve(args: argparse.Namespace) -> int:
    from amo_gateway.serve import run, serve  # the server's imports are not needed by the other commands

    settings = _settings(args, host=args.host, port=args.port, vault_path=args.vault_path)
    logs.configure(settings.log_format, settings.log_level)
    sandbox = None
    if args.sandbox and not settings.client_secret:
        from amo_gateway.devmode import banner, sandbox_setup

        workdir = settings.vault_path.parent
        settings, sandbox = sandbox_setup(settings, workdir)
        banner(settings, workdir)
    settings.require("client_id", "client_secret", "redirect_uri", "base_url", "admin_token")
    run(serve(settings, sandbox=sandbox))
    return 0


def _gen_key(args: argparse.Namespace) -> int:
    print(Fernet.generate_key().decode())
    return 0


def _rotate_key(args: argparse.Namespace) -> int:
    settings = _settings(args)
    key_file = args.key_file or settings.vault_key_file
    if key_file is None:
        raise ConfigError("rotate-key needs the key file to rewrite: --key-file PATH or AMO_VAULT_KEY_FILE")
    vault = Vault(settings.vault_path, KeyRing.parse(key_file.read_text(encoding="utf-8")))
    vault.prepare()  # refuses a symlinked vault or lock file before anything is read or written
    vault.read()  # proves the old keys work before anything is written
    new_keys = vault.keys.rotated()
    write_key_file(key_file, new_keys)  # lists the old keys too: a crash before the next line loses nothing
    vault.reencrypt(new_keys)
    resealed = _reseal(settings, new_keys)
    if args.drop_old:
        _reseal(settings, new_keys)  # rows a replica wrote under the old key meanwhile
        new_keys = KeyRing(new_keys.keys[:1])
        Vault(settings.vault_path, new_keys).read()  # the vault opens with the new key alone before the rest go
        _reseal(settings, new_keys)  # so does every database row (one the old key still seals fails here)
        write_key_file(key_file, new_keys)
    if resealed is not None:
        print(f"{resealed} database row(s) re-encrypted under the new key")
    from amo_gateway.audit import record_now

    record_now(settings, new_keys, "key.rotated", key_count=len(new_keys.keys),
               dropped_old=args.drop_old)
    print(f"vault re-encrypted under a new primary key; {key_file} now lists {len(new_keys.keys)} "
          f"key{'s' if len(new_keys.keys) > 1 else ''} (restart the service so it loads them; copy the key file "
          "to wherever the off-site backup of the key lives)")
    return 0


def _restore(args: argparse.Namespace) -> int:
    """Put a backup in place of the vault, every refresh token marked for verification at once.

    A backup may hold a refresh token amoCRM has spent since (single use): each restored pair is made due
    now, so the running service (it watches the file) or the next start spends it at once and learns the
    truth within seconds, instead of at the next scheduled refresh hours later.
    """
    from amo_gateway.audit import record_now
    from amo_gateway.restore import mark_for_verification, replace_accounts

    settings = _settings(args)
    url = settings.secret("database_url")
    vault = Vault(settings.vault_path, _keys(settings)) if url else _vault(settings)
    try:
        blob = sys.stdin.buffer.read() if args.backup == "-" else Path(args.backup).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read backup {args.backup}: {err.strerror or type(err).__name__}") from None
    restored = vault.decode(blob)
    marked = mark_for_verification(restored, time.time())
    if url:  # the replicas hear of it (NOTIFY) as the service hears of a vault file's change
        from amo_gateway.state_tools import restore_in_database

        restore_in_database(url, vault.keys, restored)
    else:
        vault.update(lambda data: replace_accounts(data, restored))
    record_now(settings, vault.keys, "vault.restored",
               accounts=len(restored.accounts), verifying=marked)
    print(f"restored {len(restored.accounts)} account(s) from {args.backup}; {marked} refresh token(s) are "
          "verified with amoCRM at once (within seconds if the service runs, else at its start). One that amoCRM "
          "already spent turns its account to reauth_required (token_revoked): reconnect it then "
          "(`amo-gateway reconnect`).")
    return 0


def _reseal(settings: Settings, keys: KeyRing) -> int | None:
    """With AMO_DATABASE_URL: re-encrypt the database rows in batches (the service may keep running)."""
    url = settings.secret("database_url")
    if not url:
        return None
    from amo_gateway.state_tools import reseal_database

    return reseal_database(url, keys)


def _migrate_state(args: argparse.Namespace) -> int:
    from amo_gateway.state_tools import migrate_state

    settings = _settings(args)
    print(migrate_state(settings.vault_path, settings.secret("database_url"), _keys(settings), args.to))
    return 0


def _reencrypt(args: argparse.Namespace) -> int:
    """The service user's half of a key rotation: root already put a new key first in the key file."""
    settings = _settings(args)
    vault = _vault(settings)
    vault.read()  # proves the ring still decrypts the vault before it is rewritten
    vault.reencrypt(vault.keys)
    _reseal(settings, vault.keys)
    from amo_gateway.audit import record_now

    record_now(settings, vault.keys, "key.rotated",
               key_count=len(vault.keys.keys))
    print(f"vault re-encrypted under the first of {len(vault.keys.keys)} keys")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from amo_gateway.audit import read_trail, show

    where, lines = read_trail(_settings(args), args.tail)
    if not lines:
        print(f"the audit log is empty ({where}): nothing has been connected, refused or changed yet",
              file=sys.stderr)
    for line in show(lines, args.json):
        print(line)
    return 0


def _authorize_url(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(_consent_url(settings, args.label))
    return 0


def _consent_url(settings: Settings, label: str | None) -> str:
    """A consent URL whose state is stored where the gateway looks: the database, or the vault file."""
    from amo_gateway.clock import SystemClock
    from amo_gateway.flows import Flows
    from amo_gateway.store import Store

    url = settings.secret("database_url")
    if url:
        from amo_gateway.state_tools import on_database

        def issue(store: StateStore) -> Awaitable[str]:
            return Flows(settings, store, None, SystemClock()).authorize_url(label)  # type: ignore[arg-type]

        return on_database(url, _keys(settings), issue)
    flows = Flows(settings, Store(_vault(settings)), None, SystemClock())  # type: ignore[arg-type]
    return asyncio.run(flows.authorize_url(label))


def _forget(args: argparse.Namespace) -> int:
    """Remove one account (by id or subdomain) and its tokens; amoCRM is not told (see the README)."""
    from amo_gateway.audit import record_now

    settings = _settings(args)
    data = _stored(settings)
    matches = [a for a in data.accounts.values() if args.account in (a.account_id, a.subdomain)]
    if not matches:
        raise ConfigError(f"no account {args.account[:64]!r} in the vault (see `amo-gateway status`)")
    account_id = matches[0].account_id
    if not args.yes and not _confirm(f"forget account {account_id} ({matches[0].base_url}) and its tokens?"):
        print("nothing changed")
        return 1
    url = settings.secret("database_url")
    if url:
        from amo_gateway.state_tools import forget_in_database

        forget_in_database(url, _keys(settings), account_id)
    else:
        _vault(settings).update(lambda d: d.accounts.pop(account_id, None))
    record_now(settings, _keys(settings), "account.forgotten", account=account_id, by="cli")
    print(f"account {account_id} forgotten; reconnect it with `amo-gateway reconnect` when needed")
    return 0


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise ConfigError("refusing to forget without confirmation: pass --yes")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _reconnect(args: argparse.Namespace) -> int:
    """A fresh consent URL, and what to do with it (or with the API key instead)."""
    from amo_gateway.settings import PREFIX

    settings = _settings(args)
    url = _consent_url(settings, args.label or "reconnect")
    minutes = settings.state_ttl // 60
    print(f"""To re-authorize, either:

1. Open this URL in a browser signed in to amoCRM as an administrator of the account, pick the account and
   press Allow. amoCRM sends the browser back to the gateway's callback, which stores the new pair.
   The link works once and for {minutes} minutes:

   {url}

2. Or, with the account's API key (amoCRM: Settings > API), from a machine the site allows or through the
   SSH tunnel (one exchange per login every 5 minutes; a second one within 5 minutes gets 429):

   curl -X POST http://127.0.0.1:{settings.port}{PREFIX}/exchange-api-key \\
        -H "Authorization: Bearer $ADMIN_TOKEN" -H 'Content-Type: application/json' \\
        -d '{{"login": "admin@example.com", "api_key": "…"}}'

Then `amo-gateway status` shows the account connected.""")
    return 0


def _stored(settings: Settings) -> VaultData:
    """Every account as stored: in the database when AMO_DATABASE_URL is set, else in the vault file."""
    url = settings.secret("database_url")
    if not url:
        return _vault(settings).read()[0]
    from amo_gateway.state_tools import export_database

    return export_database(url, _keys(settings))


def _keys(settings: Settings) -> KeyRing:
    return load_keyring(settings.vault_key_file, os.environ.get("CREDENTIALS_DIRECTORY"), settings.secret("vault_key"))


def _status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    data = _stored(settings)
    rows = [account_summary(a, time.time()) for a in data.accounts.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no account connected")
        return 0
    print(f"{'account':<12} {'host':<34} {'state':<16} {'access expires (UTC)':<21} {'refresh age':<12} last error")
    for row in rows:
        expires = row["access_expires_at"]
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(expires)) if expires else "-"
        age = "long-lived" if row["long_lived"] else f"{row['refresh_token_age_days']}d"
        print(f"{row['account_id']:<12} {row['host']:<34} {row['state']:<16} {when:<21} {age:<12} "
              f"{row['last_error'] or '-'}")
    return 0


def _import_token(args: argparse.Namespace) -> int:
    """Store a long-lived token (private integrations): never refreshed, its expiry watched like any other."""
    settings = _settings(args)
    token = _read_token(args.token_file)
    claims = decode_claims(token)
    account_id = str(args.account_id or claims.get("account_id") or settings.account_id or "")
    if not account_id or not isinstance(claims.get("exp"), int | float):
        raise ConfigError("the token is not a JWT with account_id and exp claims; pass --account-id and check it")
    now = time.time()
    if claims["exp"] <= now:
        raise ConfigError(f"the token expired at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(claims['exp']))}: "
                          "create a new long-lived token in amoCRM and import that")
    base_url = _import_base_url(args.host, settings)
    pair = TokenPair(token, None, float(claims["exp"]), now)
    account = Account(account_id, base_url, pair, long_lived=True, api_domain=claims.get("api_domain"),
                      subdomain=account_subdomain(base_url, settings), connected_at=now)
    database = settings.secret("database_url")
    if database:
        from amo_gateway.state_tools import on_database

        on_database(database, _keys(settings), lambda store: store.put_account(account))
    else:
        _vault(settings).update(lambda data: data.accounts.__setitem__(account_id, account))
    print(f"stored a long-lived token for account {account_id} at {base_url}, expiring "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(pair.expires_at))}")
    return 0


def _read_token(source: str) -> str:
    """The token from a file or standard input; a file that cannot be read is one line naming it."""
    if source == "-":
        return sys.stdin.readline().strip()
    try:
        return Path(source).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConfigError(f"cannot read token file {source}: {err.strerror or type(err).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read token file {source}: not UTF-8 text") from None


def _import_base_url(host: str | None, settings: Settings) -> str:
    """The account's URL: --host must be the configured account or an amoCRM/Kommo account host."""
    if host is None:
        if not settings.account_base_url:
            raise ConfigError("say which account host the token belongs to: --host sub.amocrm.ru or AMO_DOMAIN")
        return settings.account_base_url
    name = host_of(host)
    if name and name in configured_hosts(settings):
        return settings.account_base_url or account_url(settings.account_url_template, name)
    if amo_subdomain(name, settings.allowed_base_domains) is None:
        raise ConfigError(f"--host {host[:100]!r} is not an amoCRM/Kommo account host ({{sub}}.one of "
                          f"{', '.join(settings.allowed_base_domains)}; AMO_ALLOWED_BASE_DOMAINS)")
    return account_url(settings.account_url_template, name)
