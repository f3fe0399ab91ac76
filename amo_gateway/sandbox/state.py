"""Live state of the sandbox: codes, token chains, rate windows, test switches and counters."""

from __future__ import annotations

import base64
import json
import secrets
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from amo_gateway.sandbox.config import SandboxAccount, SandboxConfig
from amo_gateway.sandbox.entities import EntityStore

PROBLEM_TYPE = "https://developers.amocrm.ru/v3/errors/OAuthProblemJson"
BAD_REQUEST = ("The request is missing a required parameter, includes an invalid parameter value, "
               "or is otherwise malformed.")
BAD_REFRESH = "The refresh token is invalid."
ROUTES = ("token", "exchange", "account", "api", "subdomain")


class OAuthProblem(Exception):
    """An upstream refusal the app renders as application/problem+json."""

    def __init__(self, status: int, hint: str, title: str = "Некорректный запрос", detail: str = BAD_REQUEST,
                 type_: str = PROBLEM_TYPE) -> None:
        super().__init__(hint)
        self.status, self.hint, self.title, self.detail, self.type = status, hint, title, detail, type_

    def body(self) -> dict[str, Any]:
        """The problem document amoCRM sends."""
        return {"hint": self.hint, "title": self.title, "type": self.type,
                "status": self.status, "detail": self.detail}


@dataclass
class _Code:
    """An authorization code issued for an account."""

    account_id: int
    issued_at: float
    spent: bool = False


@dataclass
class _Refresh:
    """A refresh token; single-use, it dies when it is spent or revoked."""

    account_id: int
    issued_at: float
    spent: bool = False


@dataclass
class TokenPair:
    """A freshly issued access/refresh pair."""

    access_token: str
    refresh_token: str
    expires_in: int
    server_time: int

    def body(self) -> dict[str, Any]:
        """The 200 answer of the token endpoint."""
        return {"token_type": "Bearer", "expires_in": self.expires_in, "access_token": self.access_token,
                "refresh_token": self.refresh_token, "server_time": self.server_time}


def _b64(data: bytes) -> str:
    """Unpadded base64url, as in a JWT."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SandboxState:
    """All mutable state of one sandbox app, shared by handlers and tests."""

    def __init__(self, config: SandboxConfig) -> None:
        """Start empty: no codes, no tokens, no switches."""
        self.config = config
        self.clock = config.clock
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._access: dict[str, tuple[int, float]] = {}
        self._exchange_slots: dict[tuple[int, str], float] = {}
        self._arrivals: defaultdict[int, list[float]] = defaultdict(list)
        self._admitted: defaultdict[int, list[float]] = defaultdict(list)
        self._rate_limited_by_account: Counter[int] = Counter()
        self._by_subdomain: dict[str, SandboxAccount] = {}  # indexes, so a request costs O(1) at 10 000 accounts
        self._by_id: dict[int, SandboxAccount] = {}
        # Test switches.
        self.fail_next: dict[str, list[int]] = {}
        self.delay: dict[str, float] = {}
        self.drop_next_refresh = 0
        self.revoked_accounts: set[int] = set()
        self.banned: set[int] = set()
        self.unauthorized_paths: set[str] = set()  # /api/v4 paths that answer 401 whatever the token
        # Counters.
        self.hits: Counter[str] = Counter()
        self.refresh_attempts = 0
        self.refresh_tokens_presented: Counter[str] = Counter()
        self.refresh_log: list[tuple[float, int]] = []  # (when, how often that token was presented by then)
        self.codes_issued = 0
        self.codes_redeemed = 0
        self.exchange_calls = 0
        self.callbacks: list[dict[str, Any]] = []
        self.api_requests = 0
        self.rate_limited = 0
        self.dropped_refreshes = 0
        # Leads, contacts and companies, a few of each per account to begin with.
        self.entities = EntityStore()
        for account in config.accounts:
            self.entities.seed(account.account_id, account.current_user_id, config.seed_entities, int(self.clock()))

    # Accounts.
    def account_for_host(self, host: str | None) -> SandboxAccount:
        """The account whose subdomain is the Host's first label, else the default one."""
        hostname = "" if (host or "").startswith("[") else (host or "").split(":", 1)[0]
        return self._subdomain_account(hostname.split(".", 1)[0].lower()) or self.config.accounts[0]

    def unknown_account_host(self, host: str | None) -> bool:
        """True for `{sub}.{base_domain}` whose subdomain no account has (renamed away): amoCRM answers 404."""
        hostname = (host or "").split(":", 1)[0].lower()
        suffix = "." + self.config.base_domain.lower()
        if not hostname.endswith(suffix):
            return False
        first = hostname[: -len(suffix)]
        if first == "www" or first.startswith("api-"):
            return False
        return self._subdomain_account(first) is None

    def account(self, account_id: int) -> SandboxAccount | None:
        """The account with this id, if the sandbox serves it."""
        found = self._by_id.get(account_id)
        if found is None or found.account_id != account_id:
            self._by_id = {}
            for account in self.config.accounts:
                self._by_id.setdefault(account.account_id, account)
            found = self._by_id.get(account_id)
        return found

    def _subdomain_account(self, first: str) -> SandboxAccount | None:
        """The first account whose subdomain is `first`; the index is checked on use and rebuilt on a miss,
        since tests rename an account by changing its subdomain in place."""
        found = self._by_subdomain.get(first)
        if found is None or found.subdomain.lower() != first:
            self._by_subdomain = {}
            for account in self.config.accounts:
                self._by_subdomain.setdefault(account.subdomain.lower(), account)
            found = self._by_subdomain.get(first)
        return found

    # Codes and tokens.
    def issue_code(self, account_id: int) -> str:
        """A new single-use authorization code for the account (installs the integration again)."""
        code = "def50200" + secrets.token_hex(96)
        self._codes[code] = _Code(account_id, self.clock())
        self.codes_issued += 1
        self.revoked_accounts.discard(account_id)
        return code

    def redeem_code(self, code: str, account: SandboxAccount, api_domain: str) -> TokenPair:
        """Spend a code sent to `account`'s host and mint the first pair of a grant chain."""
        record = self._codes.get(code)
        if record is None:
            raise OAuthProblem(400, "Cannot decrypt the authorization code")
        if record.issued_at + self.config.code_ttl < self.clock():
            raise OAuthProblem(400, "Authorization code has expired")
        if record.spent:
            raise OAuthProblem(400, "Authorization code has been revoked")
        if record.account_id != account.account_id:
            raise OAuthProblem(400, "Invalid account")
        record.spent = True
        self.codes_redeemed += 1
        return self._mint(account.account_id, api_domain)

    def refresh(self, token: str, account: SandboxAccount, api_domain: str) -> TokenPair:
        """Spend a refresh token sent to `account`'s host and mint the next pair of its chain."""
        self.refresh_attempts += 1
        self.refresh_tokens_presented[token] += 1
        self.refresh_log.append((self.clock(), self.refresh_tokens_presented[token]))
        record = self._refresh.get(token)
        if record is None or record.spent:
            raise OAuthProblem(401, "Token has been revoked", detail=BAD_REFRESH)
        if record.issued_at + self.config.refresh_ttl < self.clock():
            raise OAuthProblem(401, "Token has expired", detail=BAD_REFRESH)
        if record.account_id != account.account_id:
            raise OAuthProblem(401, "Token is not linked to client", detail=BAD_REFRESH)
        record.spent = True
        return self._mint(account.account_id, api_domain)

    def _mint(self, account_id: int, api_domain: str) -> TokenPair:
        """Issue a JWT-shaped access token and an opaque refresh token."""
        now = int(self.clock())
        exp = now + self.config.access_ttl
        header = {"typ": "JWT", "alg": "RS256"}
        claims = {"aud": self.config.client_id, "jti": secrets.token_hex(20), "iat": now, "nbf": now,
                  "exp": exp, "sub": str(account_id + 1), "account_id": account_id,
                  "base_domain": self.config.base_domain, "api_domain": self.config.api_domain or api_domain,
                  "client_uuid": self.config.client_id, "scopes": ["crm", "notifications"]}
        access = ".".join(_b64(json.dumps(p, separators=(",", ":")).encode()) for p in (header, claims))
        access += "." + _b64(secrets.token_bytes(32))
        refresh = "def50200" + secrets.token_hex(256)
        self._access[access] = (account_id, float(exp))
        self._refresh[refresh] = _Refresh(account_id, float(now))
        return TokenPair(access, refresh, self.config.access_ttl, now)

    def access_account(self, token: str) -> int | None:
        """The account of a valid, unexpired access token, else None."""
        found = self._access.get(token)
        if found is None or found[1] <= self.clock():
            return None
        return found[0]

    def refresh_account(self, token: str) -> SandboxAccount | None:
        """The account of a live refresh token (not spent, not expired), else None."""
        record = self._refresh.get(token)
        if record is None or record.spent or record.issued_at + self.config.refresh_ttl < self.clock():
            return None
        return self.account(record.account_id)

    def live_refresh_token(self, account_id: int) -> str | None:
        """The newest live refresh token of the account, for tests."""
        live = [t for t, r in self._refresh.items()
                if r.account_id == account_id and self.refresh_account(t) is not None]
        return live[-1] if live else None

    def live_refresh_tokens(self) -> dict[int, str]:
        """The newest live refresh token of every account that has one, in one pass (benchmarks, 10 000 accounts)."""
        return {r.account_id: t for t, r in self._refresh.items() if self.refresh_account(t) is not None}

    def live_refresh_count(self, account_id: int) -> int:
        """How many live refresh tokens the account has (normally one per grant chain)."""
        return sum(1 for t, r in self._refresh.items()
                   if r.account_id == account_id and self.refresh_account(t) is not None)

    def revoke(self, account_id: int, *, access: bool = True) -> int:
        """Kill the account's live refresh tokens (and access tokens), as a user's disconnect does."""
        killed = 0
        for record in self._refresh.values():
            if record.account_id == account_id and not record.spent:
                record.spent, killed = True, killed + 1
        if access:
            self._access = {t: v for t, v in self._access.items() if v[0] != account_id}
        self.revoked_accounts.add(account_id)
        return killed

    def expire_access(self, account_id: int) -> int:
        """Kill only the account's access tokens (refresh tokens stay live), as an early expiry does."""
        before = len(self._access)
        self._access = {t: v for t, v in self._access.items() if v[0] != account_id}
        return before - len(self._access)

    @property
    def refresh_tokens_reused(self) -> int:
        """How many refresh grants presented a token already presented before (must stay 0)."""
        return sum(n - 1 for n in self.refresh_tokens_presented.values() if n > 1)

    # API-key exchange.
    def take_exchange_slot(self, account_id: int, login: str) -> bool:
        """Open the login's exchange window if it is free; a refused call does not reset it."""
        now, key = self.clock(), (account_id, login)
        last = self._exchange_slots.get(key)
        if last is not None and now - last < self.config.exchange_interval:
            return False
        self._exchange_slots[key] = now
        return True

    # Rate limiting.
    def record_api_arrival(self, account_id: int) -> None:
        """Note an /api/v4 request's arrival time."""
        self.api_requests += 1
        self._arrivals[account_id].append(self.clock())

    def admit(self, account_id: int) -> bool:
        """Whether a request fits the per-second limit; a refusal counts towards the ban."""
        now = self.clock()
        recent = [t for t in self._admitted[account_id] if now - t < 1.0]
        if len(recent) < self.config.rate_limit:
            recent.append(now)
            self._admitted[account_id] = recent
            return True
        self._admitted[account_id] = recent
        self.rate_limited += 1
        self._rate_limited_by_account[account_id] += 1
        ban_after = self.config.ban_after
        if ban_after is not None and self._rate_limited_by_account[account_id] >= ban_after:
            self.banned.add(account_id)
        return False

    def arrivals(self) -> dict[str, Any]:
        """When each /api/v4 request and each refresh arrived (the sandbox's clock), for evidence scripts.

        A refresh is `[when, n]`, n being how often its token had been presented by then (n > 1: a reuse).
        """
        return {"api": {str(a): list(times) for a, times in self._arrivals.items()},
                "refreshes": [list(entry) for entry in self.refresh_log]}

    def max_requests_in_window(self, account_id: int, window: float = 1.0) -> int:
        """The most /api/v4 arrivals of the account seen in any `window`-second span."""
        times, best, start = sorted(self._arrivals[account_id]), 0, 0
        for end, t in enumerate(times):
            while t - times[start] >= window:
                start += 1
            best = max(best, end - start + 1)
        return best

    # Switches.
    def pop_fault(self, route: str) -> int | None:
        """The next queued fault status for a route, if any."""
        queue = self.fail_next.get(route)
        return queue.pop(0) if queue else None

    def take_drop(self) -> bool:
        """Whether this refresh's answer must be lost."""
        if self.drop_next_refresh <= 0:
            return False
        self.drop_next_refresh -= 1
        self.dropped_refreshes += 1
        return True

    def always_unauthorized(self, path: str) -> bool:
        """Whether this API path answers 401 to any token (as amoCRM does for a user without rights)."""
        return path in self.unauthorized_paths

    def set_switches(self, data: dict[str, Any]) -> None:
        """Apply switches from JSON: fail_next/delay per route, drop_next_refresh, banned, unauthorized_paths,
        clear."""
        if data.get("clear"):
            self.fail_next, self.delay, self.drop_next_refresh = {}, {}, 0
            self.unauthorized_paths = set()
        for route, statuses in dict(data.get("fail_next") or {}).items():
            self.fail_next[str(route)] = [int(s) for s in statuses]
        for route, seconds in dict(data.get("delay") or {}).items():
            self.delay[str(route)] = float(seconds)
        if "drop_next_refresh" in data:
            self.drop_next_refresh = int(data["drop_next_refresh"])
        if "banned" in data:
            self.banned = {int(a) for a in data["banned"]}
        if "unauthorized_paths" in data:
            self.unauthorized_paths = {str(p) for p in data["unauthorized_paths"]}

    def stats(self) -> dict[str, Any]:
        """Counters and switches as JSON, without any token or code string."""
        ids = [a.account_id for a in self.config.accounts]
        return {
            "refresh_attempts": self.refresh_attempts, "refresh_tokens_reused": self.refresh_tokens_reused,
            "refresh_tokens_presented": sum(self.refresh_tokens_presented.values()),
            "codes_issued": self.codes_issued, "codes_redeemed": self.codes_redeemed,
            "exchange_calls": self.exchange_calls, "api_requests": self.api_requests,
            "rate_limited": self.rate_limited, "dropped_refreshes": self.dropped_refreshes,
            "hits": dict(self.hits),
            "callbacks": [{k: v for k, v in c.items() if k != "code"} for c in self.callbacks],
            "live_refresh_tokens": {str(a): self.live_refresh_count(a) for a in ids},
            "max_requests_in_window": {str(a): self.max_requests_in_window(a) for a in ids},
            "fail_next": self.fail_next, "delay": self.delay, "drop_next_refresh": self.drop_next_refresh,
            "banned": sorted(self.banned), "revoked_accounts": sorted(self.revoked_accounts),
            "unauthorized_paths": sorted(self.unauthorized_paths),
        }


SANDBOX_STATE = web.AppKey("sandbox_state", SandboxState)
