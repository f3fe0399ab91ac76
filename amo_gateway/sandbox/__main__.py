"""`python -m amo_gateway.sandbox`: run the amoCRM stand-in as a standalone server."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aiohttp import web

from amo_gateway.sandbox.app import create_sandbox_app
from amo_gateway.sandbox.config import SandboxAccount, SandboxConfig


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of the standalone sandbox."""
    p = argparse.ArgumentParser(prog="python -m amo_gateway.sandbox", description="amoCRM sandbox server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8099)
    p.add_argument("--client-id", required=True)
    p.add_argument("--client-secret", required=True)
    p.add_argument("--redirect-uri", required=True)
    p.add_argument("--account-id", type=int, default=31920194)
    p.add_argument("--subdomain", default="demo")
    p.add_argument("--account-name", default="Sandbox account")
    p.add_argument("--login", default="demo@example.com")
    p.add_argument("--api-key", default="sandbox-api-key")
    p.add_argument("--forbidden-login", action="append", default=[], help="exchange answers 403 for it")
    p.add_argument("--access-ttl", type=int, default=86400)
    p.add_argument("--code-ttl", type=int, default=1200)
    p.add_argument("--exchange-interval", type=float, default=300)
    p.add_argument("--callback-delay", type=float, default=0.05)
    p.add_argument("--no-referer", action="store_true", help="exchange callbacks carry no referer")
    p.add_argument("--base-domain", default="amocrm.ru")
    p.add_argument("--api-domain", default=None)
    p.add_argument("--rate-limit", type=int, default=7)
    p.add_argument("--ban-after", type=int, default=None)
    p.add_argument("--seed-entities", type=int, default=3, help="leads, contacts and companies the account starts with")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    """A SandboxConfig with one account built from the parsed flags."""
    account = SandboxAccount(account_id=args.account_id, subdomain=args.subdomain,
                             users={args.login: args.api_key}, forbidden_logins=set(args.forbidden_login),
                             name=args.account_name)
    return SandboxConfig(
        client_id=args.client_id, client_secret=args.client_secret, redirect_uri=args.redirect_uri,
        accounts=[account], access_ttl=args.access_ttl, code_ttl=args.code_ttl,
        exchange_interval=args.exchange_interval, callback_delay=args.callback_delay,
        send_referer=not args.no_referer, base_domain=args.base_domain, api_domain=args.api_domain,
        rate_limit=args.rate_limit, ban_after=args.ban_after, seed_entities=args.seed_entities)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and serve until interrupted."""
    args = parse_args(argv)
    config = config_from_args(args)
    print(f"amoCRM sandbox on http://{args.host}:{args.port} account_id={args.account_id} "
          f"subdomain={args.subdomain} redirect_uri={args.redirect_uri}", flush=True)
    web.run_app(create_sandbox_app(config), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
