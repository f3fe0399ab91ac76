"""The amoCRM API proxy: `{prefix}/proxy/{path}` forwarded to the account host with the current token injected.

`{prefix}/accounts/{id or subdomain}/proxy/{path}` is the same proxy with the account named by the URL (a
client library's base URL). In JSON answers, amoCRM's links are moved under the URL the caller used (links.py).

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
from prometheus_client import Counter, Histogram
from yarl import URL

from amo_gateway.accounts import account_hosts, select_account
from amo_gateway.audit import AuditLog
from amo_gateway.auth import Authenticator
from amo_gateway.breaker import Breakers
from amo_gateway.errors import GatewayError, RequestRejected, UpstreamTimeout, UpstreamUnavailable
from amo_gateway.idempotency import MAX_REMEMBERED_BODY, decoded, request_fingerprint
from amo_gateway.links import REWRITE_CAP, LinkRewriter, is_json, rewriter
from amo_gateway.logs import event
from amo_gateway.manager import TokenManager
from amo_gateway.metrics import Metrics
from amo_gateway.proxy_paths import ACCOUNTS_ROOT, ROOT, proxied
from amo_gateway.refresh_budget import RefreshBudget
from amo_gateway.settings import Settings
from amo_gateway.upstream import ConnectFailed, UpstreamPool, UpstreamResponse

log = logging.getLogger("amo_gateway.proxy")

ACCOUNT_HEADER = "X-Amo-Account"
RETRY_BUFFER = 256 * 1024
CHUNK = 64 * 1024
MAX_AUDITED_PATH = 256  # a refused path is audited clipped: the trail must not grow by what callers send
MAX_RETRY_AFTER = 5.0  # a longer Retry-After goes back to the caller instead of holding its connection
Headers = tuple[tuple[str, str], ...]
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
KEYED = frozenset({"POST", "PATCH"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade"})
DROP_UP = HOP_BY_HOP | {"authorization", "cookie", "host", "expect", "idempotency-key", ACCOUNT_HEADER.lower(),
                        "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip"}
DROP_DOWN = HOP_BY_HOP | {"set-cookie", "set-cookie2"}


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
    """Who asks, for which account, the checked path and query to forward, and the account its URL names."""

    consumer: str
    account_id: str
    target: str
    named: str | None = None  # `demo` when the caller used `…/accounts/demo/proxy/…`


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

    def __init__(self, settings: Settings, upstream: UpstreamPool, manager: TokenManager,
                 auth: Authenticator, metrics: Metrics, *, audit: AuditLog | None = None,
                 rng: random.Random | None = None, budget: RefreshBudget | None = None) -> None:
        self.settings = settings
        self.upstream = upstream
        self.manager = manager
        self.auth = auth
        self.metrics = metrics
        self.audit = audit
        self.limiters = manager.store.limiters(settings.rate_limit, settings.proxy_queue,
                                               window=1.0 + settings.rate_guard)
        self.breakers = Breakers(settings.breaker_cooldown, time.monotonic)
        self.budget = budget or RefreshBudget(settings.proxy_refresh_interval)  # shared by replicas on PostgreSQL
        self.idempotency = manager.store.answers(settings.idempotency_window, settings.idempotency_max_bytes,
                                                 on_evict=metrics.idempotency_evictions.inc)
        metrics.idempotency_bytes.set_function(lambda: self.idempotency.size)
        self._rng = rng or random.Random()  # noqa: S311 - jitter only
        self.rewrite_cap = REWRITE_CAP  # JSON answers up to this size get their links rewritten (links.py)
        self._series: dict[tuple[str, int], tuple[Counter, Histogram]] = {}  # (account, status) -> its two series

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Any method on `{prefix}/proxy/{path}` or `{prefix}/accounts/{account}/proxy/{path}`."""
        consumer = self.auth.consumer_or_operator(request)
        target, named = self._target(request, consumer)
        account_id = await self._account(request, named)
        started = time.monotonic()
        try:
            return await self._handle(request, Caller(consumer, account_id, target, named), started)
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
                links = await self._links(request, caller, _header(replay.headers, "content-type"))
                return _replayed(replay.status or 0, replay.headers, replay.body or b"", links)
        resp = await self._exchange(call)
        self._count(account_id, resp.status, started)
        try:
            links = await self._links(request, caller, resp.headers.get("Content-Type"))
            if call.key is not None:
                return await self._relay_remembered(request, call, resp, links)
            return await _relay(request, resp, b"", links)
        finally:
            resp.release()

    async def _links(self, request: web.Request, caller: Caller, content_type: str | None) -> LinkRewriter | None:
        """For a JSON answer only: what moves amoCRM's links under the URL this caller used (links.py)."""
        if not is_json(content_type) or request.method == "HEAD":
            return None  # the hot path for everything else: no lookup, no buffering (HEAD has no body)
        account = await self.manager.store.account(caller.account_id)
        if account is None:
            return None
        origin = f"{request.scheme}://{request.host}"  # as seen through trusted proxies (forwarded.py)
        if caller.named is not None:
            base, extra = f"{origin}{ACCOUNTS_ROOT}{caller.named}/proxy", ""
        else:
            base, extra = origin + ROOT.rstrip("/"), f"account={caller.account_id}"
        hosts = account_hosts(account, self.settings)
        return rewriter(hosts, tuple(self.settings.proxy_paths), base, extra, self.rewrite_cap)

    def _target(self, request: web.Request, consumer: str) -> tuple[str, str | None]:
        """The path and query to forward, and the account the path names; a refused path is counted, logged
        and audited, and never sent."""
        try:
            return proxied(request.raw_path, self.settings.proxy_paths)
        except RequestRejected as err:
            path = request.raw_path.partition("?")[0][:MAX_AUDITED_PATH]  # never the query: it may hold anything
            self.metrics.proxy_refused.labels(err.code).inc()
            event(log, "proxy.refused", level=logging.WARNING, consumer=consumer, reason=err.code,
                  method=request.method)
            if self.audit is not None:
                self.audit.record("proxy.refused", consumer=consumer, reason=err.code, method=request.method,
                                  path=path)
            raise

    async def _account(self, request: web.Request, named: str | None) -> str:
        """The account id: the one the per-account URL names, else X-Amo-Account, else ?account=."""
        selector = named or request.headers.get(ACCOUNT_HEADER) or request.query.get("account")
        return select_account(await self.manager.store.snapshot(), selector)

    async def _call(self, request: web.Request, caller: Caller) -> Call:
        dropped = _dropped(request)
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in dropped)
        key = request.headers.get("Idempotency-Key") if request.method in KEYED else None
        body = await _read_body(request)
        if body.resendable:
            headers.popall("Content-Length", None)  # aiohttp sets it from the bytes
        return Call(caller.consumer, caller.account_id, request.method, caller.target, headers, body, key)

    async def _exchange(self, call: Call) -> UpstreamResponse:
        """Send, with one refresh-and-retry on 401 and bounded backoff on 429; the last answer is returned."""
        refreshed, spent, attempt = False, False, 0
        while True:
            await self.manager.access(call.account_id)  # not connected / reauth: said before queueing
            resp, token = await self._send_once(call)
            if spent and _authenticated(resp.status):
                await self.budget.reopen(call.account_id)  # amoCRM took the new token: that refresh was needed
                spent = False
            if resp.status == 401 and not refreshed:
                refreshed = True
                try:
                    retry, spent = await self.after_401(call.account_id, token)
                except BaseException:
                    resp.release()  # the caller went away or the refresh raised: nobody reads this answer
                    raise
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
            if not await self.budget.take(account_id):
                self._noted_401(account_id, "budget_closed")
                return False, False
            outcome = await self.manager.refresh(account_id, seen=seen)
            if outcome.result == "skipped":  # another process had replaced it: nothing was spent here
                await self.budget.reopen(account_id)
            self._noted_401(account_id, outcome.result)
            return outcome.result in ("refreshed", "skipped", "reauth"), outcome.result == "refreshed"

    def _noted_401(self, account_id: str, action: str) -> None:
        """Log and count what a 401 from amoCRM led to."""
        event(log, "proxy.upstream_401", level=logging.WARNING, account=account_id, action=action)
        self.metrics.upstream_401.labels(account_id, action).inc()

    async def _send_once(self, call: Call) -> tuple[UpstreamResponse, str]:
        """One send once the limiter admits it; the answer and the access token it carried."""
        breaker = self.breakers.get(call.account_id)
        breaker.fail_fast()
        await self.limiters.get(call.account_id).acquire()
        # The token is taken after the wait in the queue (up to AMO_PROXY_QUEUE / AMO_RATE_LIMIT seconds), not
        # before it: one taken before may have expired meanwhile, and amoCRM would answer 401 to it.
        token = (await self.manager.access(call.account_id)).access_token
        breaker.before_call()
        account = await self.manager.connected(call.account_id)
        url = URL(account.base_url.rstrip("/") + call.target, encoded=True)
        headers = CIMultiDict(call.headers)
        headers["Authorization"] = f"Bearer {token}"
        try:
            resp = await self.upstream.request(call.method, url, headers, call.body.payload(),
                                               connect_timeout=self.settings.upstream_timeout,
                                               read_timeout=self.settings.proxy_timeout)
        except BaseException as exc:
            breaker.call_failed()
            await self._fail_key(call, exc)
            raise _upstream_error(exc) from None
        breaker.after_call(resp.status)
        return resp, token

    async def _fail_key(self, call: Call, exc: BaseException) -> None:
        if call.key is None:
            return
        if isinstance(exc, ConnectFailed):
            await self.idempotency.forget(call.consumer, call.key)  # never connected: nothing reached amoCRM
        else:
            await self.idempotency.unknown(call.consumer, call.key)

    def _backoff(self, resp: UpstreamResponse, attempt: int) -> float | None:
        """Seconds to wait before retrying a 429; None when amoCRM asks for longer than a caller should hold."""
        said = resp.headers.get("Retry-After", "")
        if said.isdigit():
            return float(said) if float(said) <= MAX_RETRY_AFTER else None
        return float(min(MAX_RETRY_AFTER, 0.25 * 2**attempt + self._rng.uniform(0, 0.25)))

    async def _relay_remembered(self, request: web.Request, call: Call, resp: UpstreamResponse,
                                links: LinkRewriter | None) -> web.StreamResponse:
        """Read the answer (up to the replay limit), remember it under the key, then pass it on."""
        assert call.key is not None
        head = await _read_up_to(resp.content, MAX_REMEMBERED_BODY)
        headers = _down_headers(resp)
        plain = decoded(headers, head) if len(head) <= MAX_REMEMBERED_BODY else None
        if plain is None:
            await self.idempotency.finish(call.consumer, call.key, resp.status, headers, None)
        else:
            await self.idempotency.finish(call.consumer, call.key, resp.status, *plain)  # kept as amoCRM sent it
        return await _relay(request, resp, head, links)

    def _count(self, account_id: str, status: int, started: float) -> None:
        series = self._series.get((account_id, status))
        if series is None:  # prometheus' labels() validates and locks on every call: once per series is enough
            series = (self.metrics.proxy_requests.labels(account_id, str(status)),
                      self.metrics.proxy_latency.labels(account_id))
            self._series[(account_id, status)] = series
        series[0].inc()
        series[1].observe(time.monotonic() - started)


def _authenticated(status: int) -> bool:
    """Whether an answer shows amoCRM accepted the token (a 403 ban, a 429 or a 5xx may come before that)."""
    return status < 500 and status not in (401, 403, 429)


def _dropped(request: web.Request) -> frozenset[str]:
    """Header names never sent upstream: hop-by-hop, the caller's credentials, and those `Connection` lists."""
    connection = request.headers.get("Connection")
    if not connection:
        return DROP_UP
    return DROP_UP | {h.strip().lower() for h in connection.split(",") if h.strip()}


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


def _header(headers: Headers, name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _down_headers(resp: UpstreamResponse) -> Headers:
    listed = {h.strip().lower() for h in resp.headers.get("Connection", "").split(",") if h.strip()}
    return tuple((k, v) for k, v in resp.headers.items() if k.lower() not in DROP_DOWN and k.lower() not in listed)


async def _relay(request: web.Request, resp: UpstreamResponse, head: bytes,
                 links: LinkRewriter | None) -> web.StreamResponse:
    """amoCRM's status, headers (minus hop-by-hop and cookies) and body, streamed chunk by chunk.

    A JSON answer (`links` given) up to its cap (REWRITE_CAP) is read whole first and its links rewritten (links.py);
    a longer one goes on streaming as it came, after the part already read. Any other answer whose body has
    already arrived whole goes out as one Response, headers and body in one write: a StreamResponse sends its
    headers alone first, and that extra send and the caller's extra wake-up were a measurable part of the
    proxy's cost (make bench).
    """
    headers = _down_headers(resp)
    if links is not None:
        head += await _read_up_to(resp.content, links.cap - len(head))
        if len(head) <= links.cap and resp.content.at_eof():
            return _rewritten(resp.status, headers, head, links)
    else:
        head = head or await resp.content.readany()
        if head and resp.content.at_eof():
            return web.Response(status=resp.status, reason=resp.reason, headers=headers, body=head)
    out = web.StreamResponse(status=resp.status, reason=resp.reason)
    out.headers.extend(headers)
    await out.prepare(request)
    if head:
        await out.write(head)
    async for chunk in resp.content.iter_chunked(CHUNK):
        await out.write(chunk)
    await out.write_eof()
    return out


def _rewritten(status: int, headers: Headers, body: bytes, links: LinkRewriter) -> web.Response:
    """A whole JSON answer with its links moved under the gateway; decoded, then re-compressed for this caller.

    A body that cannot be decoded (br, zstd, corrupt) or holds no link to move goes back byte for byte.
    """
    plain = decoded(headers, body, links.cap)
    moved = links.rewrite(plain[1]) if plain is not None else None
    if plain is None or moved is None:
        return _plain_response(status, headers, body, keep_etag=True)
    out = _plain_response(status, plain[0], moved)
    if plain[0] != headers:
        out.enable_compression()  # amoCRM compressed it for this caller's Accept-Encoding: so do we
    return out


def _replayed(status: int, headers: Headers, body: bytes, links: LinkRewriter | None) -> web.Response:
    """A remembered (decoded) answer, marked as a replay, compressed only if this caller accepts it."""
    moved = links.rewrite(body) if links is not None else None
    out = _plain_response(status, headers, body if moved is None else moved)
    out.headers["Idempotent-Replayed"] = "true"
    out.enable_compression()  # aiohttp picks gzip or deflate from this request's Accept-Encoding, or none
    return out


def _plain_response(status: int, headers: Headers, body: bytes, *, keep_etag: bool = False) -> web.Response:
    """A response with `body` and amoCRM's headers, its own Content-Length; ETag only for an unchanged body."""
    dropped = ("content-length", "content-type") if keep_etag else ("content-length", "content-type", "etag")
    out = web.Response(status=status, body=body)
    out.headers.extend((k, v) for k, v in headers if k.lower() not in dropped)
    for k, v in headers:
        if k.lower() == "content-type":
            out.headers["Content-Type"] = v
    return out


def _upstream_error(exc: BaseException) -> BaseException:
    """A transport failure as the domain error the middleware shapes; anything else unchanged."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("amoCRM did not answer the proxied request in time", maybe_processed=True)
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamUnavailable(f"cannot reach amoCRM ({type(exc).__name__})")
    return exc
