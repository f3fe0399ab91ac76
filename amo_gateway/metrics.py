"""Prometheus metrics, in a registry of the app's own (never the global one, so apps and tests don't collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from amo_gateway.breaker import STATE_VALUES
from amo_gateway.manager import Outcome
from amo_gateway.tokens import CONNECTED, VaultData

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every series the gateway exports; gauges about tokens are filled from the vault at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.refreshes = Counter("amo_gateway_refreshes", "Refresh attempts by outcome",
                                 ["account", "outcome"], registry=r)
        self.access_expires_in = Gauge("amo_gateway_access_token_expires_in_seconds",
                                       "Seconds until the stored access token expires", ["account"], registry=r)
        self.refresh_age = Gauge("amo_gateway_refresh_token_age_seconds",
                                 "Age of the stored refresh token (amoCRM kills it after 3 months unused)",
                                 ["account"], registry=r)
        self.connected = Gauge("amo_gateway_account_connected",
                               "1 when the account holds a usable pair, 0 when it needs re-authorization",
                               ["account"], registry=r)
        self.proxy_requests = Counter("amo_gateway_proxy_requests", "Proxied requests by answer status",
                                      ["account", "status"], registry=r)
        self.proxy_latency = Histogram("amo_gateway_proxy_request_duration_seconds",
                                       "Proxied request time to amoCRM's response headers, queueing included",
                                       ["account"], buckets=LATENCY_BUCKETS, registry=r)
        self.proxy_refused = Counter("amo_gateway_proxy_refused", "Proxied requests refused for their path, by reason "
                                     "(never sent to amoCRM)", ["reason"], registry=r)
        self.upstream_401 = Counter("amo_gateway_proxy_upstream_401",
                                    "401s from amoCRM by what followed: refreshed (a refresh token spent), shared "
                                    "(retried with another caller's new token), budget_closed (passed back, no "
                                    "refresh), or the refresh's other outcome", ["account", "action"], registry=r)
        self.idempotency_bytes = Gauge("amo_gateway_idempotency_bytes",
                                       "Bytes of answers remembered for Idempotency-Key replays", registry=r)
        self.idempotency_evictions = Counter("amo_gateway_idempotency_evictions",
                                             "Remembered answers dropped to stay under AMO_IDEMPOTENCY_MAX_BYTES",
                                             registry=r)
        self.upstream_retries = Counter("amo_gateway_proxy_upstream_retries", "Proxy retries by cause",
                                        ["account", "cause"], registry=r)
        self.queue_depth = Gauge("amo_gateway_ratelimit_queue_depth", "Callers waiting for the account's rate limit",
                                 ["account"], registry=r)
        self.connections_open = Gauge("amo_gateway_connections_open", "Client connections open on the listener",
                                      registry=r)
        self.connections_closed = Counter("amo_gateway_connections_closed",
                                          "Connections the gateway closed itself: header_timeout, evicted (idle,"
                                          " to make room under the cap), refused (over the cap, all busy)",
                                          ["reason"], registry=r)
        self.accept_errors = Counter("amo_gateway_accept_errors", "accept() failures (out of file descriptors)",
                                     registry=r)
        self.alerts_raised = Counter("amo_gateway_alerts_raised", "Alerts raised by this process, by event "
                                     "(reminders included)", ["event"], registry=r)
        self.alert_deliveries = Counter("amo_gateway_alert_deliveries", "Alert delivery attempts by this process, "
                                        "by target and result (delivered, failed)", ["target", "result"], registry=r)
        self.alerts_pending = Gauge("amo_gateway_alerts_pending", "Alert deliveries waiting in the outbox "
                                    "(all processes on the vault)", registry=r)
        self.alerts_dropped = Gauge("amo_gateway_alerts_dropped", "Undelivered alerts dropped, oldest first, to keep "
                                    "the outbox under AMO_ALERT_OUTBOX_MAX", registry=r)
        self.breaker_state = Gauge("amo_gateway_breaker_state", "Proxy circuit breaker: 0 closed, 1 half-open, 2 open",
                                   ["account"], registry=r)

    def observe_refresh(self, outcome: Outcome) -> None:
        """The token manager's observer: count every refresh outcome."""
        self.refreshes.labels(outcome.account_id, outcome.result).inc()

    def set_outbox(self, pending: int, dropped: int) -> None:
        """The outbox's figures, read from its file at scrape time."""
        self.alerts_pending.set(pending)
        self.alerts_dropped.set(dropped)

    def render(self, data: VaultData, now: float, depths: dict[str, int], breakers: dict[str, str]) -> bytes:
        """The exposition text, after refreshing the scrape-time gauges."""
        self._fill_tokens(data, now)
        for account_id, depth in depths.items():
            self.queue_depth.labels(account_id).set(depth)
        for account_id, state in breakers.items():
            self.breaker_state.labels(account_id).set(STATE_VALUES[state])
        return generate_latest(self.registry)

    def _fill_tokens(self, data: VaultData, now: float) -> None:
        for gauge in (self.access_expires_in, self.refresh_age, self.connected):
            gauge.clear()  # a disconnected account must vanish, not freeze at its last value
        for account_id, account in data.accounts.items():
            self.connected.labels(account_id).set(1 if account.status == CONNECTED and account.tokens else 0)
            if account.tokens is not None:
                self.access_expires_in.labels(account_id).set(account.tokens.expires_at - now)
            if account.refresh_obtained_at is not None:
                self.refresh_age.labels(account_id).set(now - account.refresh_obtained_at)
