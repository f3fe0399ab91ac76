"""Configuration of the sandbox: the integration's credentials, its accounts and the upstream limits."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class SandboxAccount:
    """One amoCRM account the sandbox serves, reached by its subdomain in the Host header."""

    account_id: int
    subdomain: str
    users: dict[str, str] = field(default_factory=dict)
    forbidden_logins: set[str] = field(default_factory=set)
    name: str = "Sandbox account"

    @property
    def current_user_id(self) -> int:
        """Id of the user the API answers as (derived from the account id)."""
        return self.account_id + 1


@dataclass
class SandboxConfig:
    """Everything the sandbox needs; the first account is the default for unknown hosts."""

    client_id: str
    client_secret: str
    redirect_uri: str
    accounts: list[SandboxAccount]
    access_ttl: int = 86400
    code_ttl: int = 1200
    refresh_ttl: int = 90 * 86400
    exchange_interval: float = 300
    callback_delay: float = 0.05
    send_referer: bool = True
    base_domain: str = "amocrm.ru"
    api_domain: str | None = None
    rate_limit: int = 7
    ban_after: int | None = None
    gzip_api: bool = True  # compress /api/v4 answers for callers that accept gzip, as amoCRM's nginx does
    seed_entities: int = 3  # leads, contacts and companies each account starts with
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        """Refuse a configuration without accounts or with duplicate ids/subdomains."""
        if not self.accounts:
            raise ValueError("SandboxConfig needs at least one account")
        ids = [a.account_id for a in self.accounts]
        subs = [a.subdomain for a in self.accounts]
        if len(set(ids)) != len(ids) or len(set(subs)) != len(subs):
            raise ValueError("account ids and subdomains must be unique")

    def account_host(self, account: SandboxAccount) -> str:
        """The account host as amoCRM names it, e.g. `demo.amocrm.ru`."""
        return f"{account.subdomain}.{self.base_domain}"
