"""The amoCRM API proxy: `{prefix}/proxy/{path}` forwarded to the account host with the current token injected.

Only amoCRM's API is forwarded, and only plain paths (proxy_paths.py); anything else is refused before
any upstream call. Every upstream send passes the account's breaker and rate limiter. Bodies stream both
ways; a request body up to RETRY_BUFFER bytes is held in memory so that it can be resent after a 401 (one
refresh, within the account's budget, see refresh_budget.py; one retry) or a 429 (idempotent methods only,
with backoff). POST/PATCH are resent only under the caller's Idempotency-Key, and only after a 401 (amoCRM
refused them before doing anything).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from amo_gateway.accounts import select_account
from amo_gateway.audit import AuditLog
from amo_gateway.auth import Authenticator
from amo_gateway.breaker import Breakers
from amo_gateway.errors import GatewayError, RequestRejected, UpstreamTimeout, UpstreamUnavailable
from amo_gateway.idempotency import MAX_REMEMBERED_BODY, decoded, request_fingerprint
from amo_gateway.logs import event
from amo_gateway.manager import TokenManager
from amo_gateway.metrics import Metrics
from amo_gateway.proxy_paths import forwarded_target
from amo_gateway.refresh_budget import RefreshBudget
from amo_gateway.settings import Settings

log = logging.getLogger("amo_gateway.proxy")

ACCOUNT_HEADER = "X-Amo-Account"
RETRY_BUFFER = 256 * 1024
CHUNK = 64 * 1024
MAX_AUDITED_PATH = 256  # a refused path is audited clipped: the trail must not grow by what callers send
MAX_RETRY_AFTER = 5.0  # a longer Retry-After goes back to the caller instead of holding its connection
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
KEYED = frozenset({"POST", "PATCH"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade"})
DROP_UP = HOP_BY_HOP | {"authorization", "cookie", "host", "expect", "idempotency-key", ACCOUNT_HEADER.lower(),
                        "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip"}
DROP_DOWN = HOP_BY_HOP | {"set-cookie", "set-cookie2"}
SKIP_AUTO = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")  # send only what the caller sent


@dataclass(frozen=True)
class Body:
    """A request body: whole in memory (resendable) or a one-shot stream (never resent)."""

    data: bytes | None
    stream: AsyncIterator[bytes] | None = None

    @property
    def resendable(self) -> bool:
        return self.stream is None

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        return self.stream if self.stream is not None else (self.data or None)


@dataclass(frozen=True)
class Caller:
    """Who asks, for which account, and the checked path and query to forward."""

    consumer: str
    account_id: str
    target: str


@dataclass(frozen=True)
class Call:
    """One proxied request as the gateway will send it."""

    consumer: str
    account_id: str
    method: str
    target: str  # path and query, percent-encoded as the caller sent them, without `account`
    headers: CIMultiDict[str]
    body: Body
    key: str | None

    def may_resend(self, status: int) -> bool:
        """Whether this answer may be retried: 401 for safe or keyed methods, 429 for idempotent ones."""
        if not self.body.resendable:
            return False
        if status == 401:
            return self.method in IDEMPOTENT or self.key is not None
        return status == 429 and self.method in IDEMPOTENT


class Proxy:
    """Forwards callers' requests to amoCRM under one rate budget and breaker per account."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession, manager: TokenManager,
                 auth: Authenticator, metrics: Metrics, *, audit: AuditLog | None = None,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.session = session
        self.manager = manager
        self.auth = auth
        self.metrics = metrics
        self.audit = audit
        self.limiters = manager.store.limiters(settings.rate_limit, settings.proxy_queue,
                                               window=1.0 + settings.rate_guard)
        self.breakers = Breakers(settings.breaker_cooldown, time.monotonic)
        self.budget = RefreshBudget(settings.proxy_refresh_interval)
        self.idempotency = manager.store.answers(settings.idempotency_window, settings.idempotency_max_bytes,
                                                 on_evict=metrics.idempotency_evictions.inc)
        metrics.idempotency_bytes.set_function(lambda: self.idempotency.size)
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.upstream_timeout,
                                              sock_read=settings.proxy_timeout)
        self._rng = rng or random.Random()  # noqa: S311 - jitter only

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Any method on `{prefix}/proxy/{path}`."""
        consumer = self.auth.consumer_or_operator(request)
        target = self._target(request, consumer)
        account_id = await self._account(request)
        started = time.monotonic()
        try:
            return await self._handle(request, Caller(consumer, account_id, target), started)
        except GatewayError as err:
            self.metrics.proxy_requests.labels(account_id, str(err.status)).inc()
            raise

    async def _handle(self, request: web.Request, caller: Caller, started: float) -> web.StreamResponse:
        call = await self._call(request, caller)
        account_id = caller.account_id
        if call.key is not None:
            fingerprint = request_fingerprint(call.method, call.target)
            replay = await self.idempotency.begin(call.consumer, call.key, fingerprint)
            if replay is not None:
                self._count(account_id, replay.status or 0, started)
                return _replayed(replay.status or 0, replay.headers, replay.body or b"")
        resp = await self._exchange(call)
        self._count(account_id, resp.status, started)
        try:
            if call.key is not None:
                return await self._relay_remembered(request, call, resp)
            return await _relay(request, resp, b"")
        finally:
            resp.release()

    def _target(self, request: web.Request, consumer: str) -> str:
        """The path and query to forward; a refused path is counted, logged and audited, and never sent."""
        try:
            return forwarded_target(request.raw_path, self.settings.proxy_paths)
        except RequestRejected as err:
            path = request.raw_path.partition("?")[0][:MAX_AUDITED_PATH]  # never the query: it may hold anything
            self.metrics.proxy_refused.labels(err.code).inc()
            event(log, "proxy.refused", level=logging.WARNING, consumer=consumer, reason=err.code,
                  method=request.method)
            if self.audit is not None:
                self.audit.record("proxy.refused", consumer=consumer, reason=err.code, method=request.method,
                                  path=path)
            raise

    async def _account(self, request: web.Request) -> str:
        selector = request.headers.get(ACCOUNT_HEADER) or request.query.get("account")
        return select_account(await self.manager.store.snapshot(), selector)

    async def _call(self, request: web.Request, caller: Caller) -> Call:
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _dropped(request))
        key = request.headers.get("Idempotency-Key") if request.method in KEYED else None
        body = await _read_body(request)
        if body.resendable:
            headers.popall("Content-Length", None)  # aiohttp sets it from the bytes
        return Call(caller.consumer, caller.account_id, request.method, caller.target, headers, body, key)

    async def _exchange(self, call: Call) -> aiohttp.ClientResponse:
        """Send, with one refresh-and-retry on 401 and bounded backoff on 429; the last answer is returned."""
        refreshed, spent, attempt = False, False, 0
        while True:
            token = (await self.manager.access(call.account_id)).access_token
            resp = await self._send_once(call, token)
            if spent and _authenticated(resp.status):
                self.budget.reopen(call.account_id)  # amoCRM took the new token: that refresh was needed
                spent = False
            if resp.status == 401 and not refreshed:
                refreshed = True
                retry, spent = await self.after_401(call.account_id, token)
                if retry and call.may_resend(401):
                    resp.release()
                    self.metrics.upstream_retries.labels(call.account_id, "401").inc()
                    continue
            elif resp.status == 429 and call.may_resend(429) and attempt < self.settings.proxy_retries:
                delay = self._backoff(resp, attempt)
                if delay is not None:
                    resp.release()
                    attempt += 1
                    self.metrics.upstream_retries.labels(call.account_id, "429").inc()
                    await asyncio.sleep(delay)
                    continue
            return resp

    async def after_401(self, account_id: str, seen: str) -> tuple[bool, bool]:
        """amoCRM refused `seen`: (is there a newer token to retry with, did this call spend a refresh for it).

        One decision at a time per account: a burst of 401s on one token costs one refresh, and the others
        retry with its result. While the account's budget is closed, amoCRM's 401 goes back as it came.
        A caller that spent a refresh and then got past the 401 calls `budget.reopen` (the /test probe too).
        """
        async with self.budget.lock(account_id):
            account = await self.manager.store.account(account_id)
            current = account.tokens.access_token if account is not None and account.tokens is not None else None
            if current is not None and current != seen:
                self._noted_401(account_id, "shared")
                return True, False
            if not self.budget.is_open(account_id):
                self._noted_401(account_id, "budget_closed")
                return False, False
            self.budget.close(account_id)
            outcome = await self.manager.refresh(account_id, seen=seen)
            if outcome.result == "skipped":  # another process had replaced it: nothing was spent here
                self.budget.reopen(account_id)
            self._noted_401(account_id, outcome.result)
            return outcome.result in ("refreshed", "skipped", "reauth"), outcome.result == "refreshed"

    def _noted_401(self, account_id: str, action: str) -> None:
        """Log and count what a 401 from amoCRM led to."""
        event(log, "proxy.upstream_401", level=logging.WARNING, account=account_id, action=action)
        self.metrics.upstream_401.labels(account_id, action).inc()

    async def _send_once(self, call: Call, token: str) -> aiohttp.ClientResponse:
        breaker = self.breakers.get(call.account_id)
        breaker.fail_fast()
        await self.limiters.get(call.account_id).acquire()
        breaker.before_call()
        account = await self.manager.connected(call.account_id)
        url = URL(account.base_url.rstrip("/") + call.target, encoded=True)
        headers = CIMultiDict(call.headers)
        headers["Authorization"] = f"Bearer {token}"
        try:
            resp = await self.session.request(call.method, url, headers=headers, data=call.body.payload(),
                                              allow_redirects=False, timeout=self._timeout,
                                              skip_auto_headers=SKIP_AUTO, auto_decompress=False)
        except BaseException as exc:
            breaker.call_failed()
            await self._fail_key(call, exc)
            raise _upstream_error(exc) from None
        breaker.after_call(resp.status)
        return resp

    async def _fail_key(self, call: Call, exc: BaseException) -> None:
        if call.key is None:
            return
        if isinstance(exc, aiohttp.ClientConnectorError):
            await self.idempotency.forget(call.consumer, call.key)  # never connected: nothing reached amoCRM
        else:
            await self.idempotency.unknown(call.consumer, call.key)

    def _backoff(self, resp: aiohttp.ClientResponse, attempt: int) -> float | None:
        """Seconds to wait before retrying a 429; None when amoCRM asks for longer than a caller should hold."""
        said = resp.headers.get("Retry-After", "")
        if said.isdigit():
            return float(said) if float(said) <= MAX_RETRY_AFTER else None
        return float(min(MAX_RETRY_AFTER, 0.25 * 2**attempt + self._rng.uniform(0, 0.25)))

    async def _relay_remembered(self, request: web.Request, call: Call,
                                resp: aiohttp.ClientResponse) -> web.StreamResponse:
        """Read the answer (up to the replay limit), remember it under the key, then pass it on."""
        assert call.key is not None
        head = await _read_up_to(resp.content, MAX_REMEMBERED_BODY)
        headers = _down_headers(resp)
        plain = decoded(headers, head) if len(head) <= MAX_REMEMBERED_BODY else None
        if plain is None:
            await self.idempotency.finish(call.consumer, call.key, resp.status, headers, None)
        else:
            await self.idempotency.finish(call.consumer, call.key, resp.status, *plain)
        return await _relay(request, resp, head)

    def _count(self, account_id: str, status: int, started: float) -> None:
        self.metrics.proxy_requests.labels(account_id, str(status)).inc()
        self.metrics.proxy_latency.labels(account_id).observe(time.monotonic() - started)


def _authenticated(status: int) -> bool:
    """Whether an answer shows amoCRM accepted the token (a 403 ban, a 429 or a 5xx may come before that)."""
    return status < 500 and status not in (401, 403, 429)


def _dropped(request: web.Request) -> set[str]:
    """Header names never sent upstream: hop-by-hop, the caller's credentials, and those `Connection` lists."""
    listed = {h.strip().lower() for h in request.headers.get("Connection", "").split(",") if h.strip()}
    return set(DROP_UP) | listed


async def _read_body(request: web.Request) -> Body:
    """Up to RETRY_BUFFER bytes in memory; a longer body continues as a stream of what is left."""
    if not request.body_exists:
        return Body(b"")
    chunks: list[bytes] = []
    size = 0
    while size <= RETRY_BUFFER:
        chunk = await request.content.readany()
        if not chunk:
            return Body(b"".join(chunks))
        chunks.append(chunk)
        size += len(chunk)
    return Body(None, _continue(b"".join(chunks), request.content))


async def _continue(head: bytes, rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    yield head
    async for chunk in rest.iter_chunked(CHUNK):
        yield chunk


async def _read_up_to(content: aiohttp.StreamReader, limit: int) -> bytes:
    """Read until EOF or just past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.readany()
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _down_headers(resp: aiohttp.ClientResponse) -> tuple[tuple[str, str], ...]:
    listed = {h.strip().lower() for h in resp.headers.get("Connection", "").split(",") if h.strip()}
    return tuple((k, v) for k, v in resp.headers.items() if k.lower() not in DROP_DOWN and k.lower() not in listed)


async def _relay(request: web.Request, resp: aiohttp.ClientResponse, head: bytes) -> web.StreamResponse:
    """amoCRM's status, headers (minus hop-by-hop and cookies) and body, streamed chunk by chunk."""
    out = web.StreamResponse(status=resp.status, reason=resp.reason)
    out.headers.extend(_down_headers(resp))
    await out.prepare(request)
    if head:
        await out.write(head)
    async for chunk in resp.content.iter_chunked(CHUNK):
        await out.write(chunk)
    await out.write_eof()
    return out


def _replayed(status: int, headers: tuple[tuple[str, str], ...], body: bytes) -> web.Response:
    """A remembered (decoded) answer, marked as a replay, compressed only if this caller accepts it."""
    out = web.Response(status=status, body=body)
    out.headers.extend((k, v) for k, v in headers if k.lower() not in ("content-length", "content-type"))
    for k, v in headers:
        if k.lower() == "content-type":
            out.headers["Content-Type"] = v
    out.headers["Idempotent-Replayed"] = "true"
    out.enable_compression()  # aiohttp picks gzip or deflate from this request's Accept-Encoding, or none
    return out


def _upstream_error(exc: BaseException) -> BaseException:
    """A transport failure as the domain error the middleware shapes; anything else unchanged."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("amoCRM did not answer the proxied request in time", maybe_processed=True)
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamUnavailable(f"cannot reach amoCRM ({type(exc).__name__})")
    return exc
