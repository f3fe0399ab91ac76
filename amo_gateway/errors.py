"""Domain errors, each with a stable machine code; the edge (edge.py) turns them into HTTP answers.

    GatewayError
    ├── ConfigError               settings missing or invalid (start-up stops)
    ├── VaultError                the vault cannot be read or written
    │   ├── VaultUndecryptable    wrong key, tampered or truncated file: never overwritten
    │   └── VaultFull             no room on the vault's disk: a refresh is refused before it is sent
    ├── RequestRejected           the caller's input or credentials are wrong (4xx)
    │   ├── BadRequest
    │   ├── Unauthorized
    │   ├── NotFound
    │   ├── InvalidState          callback state unknown, expired or spent
    │   ├── RefererRefused        callback referer is not an allowed account host
    │   ├── ConsentDenied         the callback carries amoCRM's `error` (the user pressed deny) instead of a code
    │   ├── StillConnected        a signed disconnect, but amoCRM still accepts the account's token (409)
    │   ├── ExchangeTooSoon       the 5-minute per-login slot is still in use (429)
    │   ├── QueueFull             the proxy's rate-limit queue is full (429)
    │   └── IdempotencyConflict   an Idempotency-Key still in flight, reused, or with an unknown outcome (409)
    ├── NotConnected              no token pair stored for the account (503)
    ├── ReauthRequired            the stored pair is dead; a human must reconnect (503)
    ├── AmoBanned                 amoCRM answered 403: the proxy's breaker is open (503)
    └── UpstreamError             amoCRM said no or could not be reached
        ├── UpstreamRejected      400 from amoCRM
        │   ├── UpstreamUnauthorized  401 (revoked or unknown token, wrong client)
        │   └── UpstreamNotFound      404 (e.g. an account that moved)
        ├── UpstreamForbidden     403 from amoCRM (rights, or the account ban)
        ├── UpstreamRateLimited   429 from amoCRM
        └── UpstreamUnavailable   network error, timeout, 5xx (transient)
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose; `detail` never carries a secret."""

    code = "internal_error"
    status = 500

    def __init__(
        self, detail: str, *, retry_after: int | None = None, code: str | None = None, **extra: object
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.extra = extra


class ConfigError(GatewayError):
    code = "config_error"


class VaultError(GatewayError):
    code = "vault_error"
    status = 503


class VaultUndecryptable(VaultError):
    code = "vault_undecryptable"


class StateUnavailable(VaultError):
    """The shared state's database cannot be reached (down, restarting, network cut)."""

    code = "state_unavailable"


class VaultFull(VaultError):
    code = "vault_disk_full"


class RequestRejected(GatewayError):
    code = "bad_request"
    status = 400


class BadRequest(RequestRejected):
    pass


class Unauthorized(RequestRejected):
    code = "unauthorized"
    status = 401


class Forbidden(RequestRejected):
    code = "forbidden"
    status = 403


class NotFound(RequestRejected):
    code = "not_found"
    status = 404


class InvalidState(RequestRejected):
    code = "invalid_state"


class RefererRefused(RequestRejected):
    code = "referer_refused"


class ConsentDenied(RequestRejected):
    code = "consent_denied"


class StillConnected(RequestRejected):
    code = "token_still_valid"
    status = 409


class ExchangeTooSoon(RequestRejected):
    code = "exchange_rate_limited"
    status = 429


class QueueFull(RequestRejected):
    code = "rate_limited"
    status = 429


class IdempotencyConflict(RequestRejected):
    code = "idempotency_conflict"
    status = 409


class NotConnected(GatewayError):
    code = "not_connected"
    status = 503


class ReauthRequired(GatewayError):
    code = "reauth_required"
    status = 503


class AmoBanned(GatewayError):
    code = "amocrm_ban"
    status = 503


class UpstreamError(GatewayError):
    code = "upstream_error"
    status = 502


class UpstreamRejected(UpstreamError):
    code = "upstream_rejected"
    status = 400


class UpstreamUnauthorized(UpstreamRejected):
    code = "upstream_unauthorized"
    status = 401


class UpstreamNotFound(UpstreamRejected):
    code = "upstream_not_found"
    status = 404


class UpstreamForbidden(UpstreamError):
    code = "forbidden_by_amocrm"
    status = 403


class UpstreamRateLimited(UpstreamError):
    code = "upstream_rate_limited"
    status = 429


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"
    status = 502


class UpstreamTimeout(UpstreamUnavailable):
    status = 504
