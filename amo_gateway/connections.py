"""Connection bounds: a cap on open connections, a deadline for a connection's first request, and accept()
errors logged at most once a second with a count.

aiohttp closes a connection idle between requests after its keep-alive timeout (AMO_KEEPALIVE_TIMEOUT), but
it holds any number of connections, and a new one may wait that long for its first request. Found by the
adversarial review: 1 100 idle connections ran the process out of descriptors, `/healthz` timed out, and
asyncio logged every failed accept() (28 MB in 25 s). Here:

- at most `cap` connections are open (AMO_MAX_CONNECTIONS, never more than the descriptor limit allows);
  a new one past the cap closes the oldest idle connection (no request in progress), so idle sockets can
  never lock callers out; with none idle it is answered 503 and closed;
- a connection that has not sent a whole request head within AMO_HEADER_TIMEOUT is closed;
- `AcceptErrors` is the loop's exception handler for the one message asyncio repeats on every failed accept().
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web import RequestHandler

from amo_gateway.logs import event
from amo_gateway.metrics import Metrics

log = logging.getLogger("amo_gateway.connections")
ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's own wording (selector_events.py)
_BODY = json.dumps({"error": "too_many_connections", "detail": "the gateway holds its maximum of connections,"
                    " all busy; retry shortly"}).encode()
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
           b"Connection: close\r\nContent-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)
ACCEPT_BURST = 128  # the listen backlog aiohttp's TCPSite asks for, which is also asyncio's accepts per tick


def descriptor_cap(wanted: int) -> int:
    """`wanted`, lowered so that connections leave descriptors free: a quarter of the limit, and at least
    ACCEPT_BURST + 64. asyncio accepts up to a backlog's worth of sockets in one loop tick before an idle
    connection closed to make room gives its descriptor back; the 64 are the vault, the audit trail and calls
    to amoCRM."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(min(wanted, soft - max(ACCEPT_BURST + 64, soft // 4)), 1)


class _Refusal(asyncio.Protocol):
    """Over the cap with no idle connection to close: answer 503 in JSON and hang up."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(REFUSAL)
        transport.close()


class ConnectionGuard:
    """Admits connections to one aiohttp server: the cap, idle eviction and the first-request deadline."""

    def __init__(self, cap: int, header_timeout: float, metrics: Metrics | None = None) -> None:
        self.cap = cap
        self.header_timeout = header_timeout
        self._metrics = metrics
        self._busy: set[RequestHandler] = set()  # connections with a request in progress
        self._waiting: dict[RequestHandler, asyncio.TimerHandle] = {}  # connections yet to send a request head
        self._closing: set[RequestHandler] = set()  # closed by us, not yet gone from the server's list
        self._pending: dict[RequestHandler, float] = {}  # admitted, not yet in the server's list (loop time)

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for `loop.create_server`: every accepted connection passes here first.

        asyncio accepts a burst of sockets before any of them reaches the server's list of connections, so
        the count adds those admitted and not yet listed (`_pending`).
        """
        if self._metrics is not None:
            self._metrics.connections_open.set_function(lambda: len(server.connections))

        def admit() -> asyncio.Protocol:
            loop = asyncio.get_running_loop()
            live = self._live(server, loop.time())
            excess = len(live) + len(self._pending) + 1 - self.cap
            if excess > 0 and not self._evict_idle(live, excess) and len(live) >= self.cap:
                self._count("refused")  # every connection is inside a request: nothing to give up for this one
                return _Refusal()
            handler = server()
            self._pending[handler] = loop.time()
            self._waiting[handler] = loop.call_later(self.header_timeout, self._too_slow, handler)
            return handler

        return admit

    def _live(self, server: web.Server, now: float) -> list[RequestHandler]:
        """The server's open connections, oldest first, minus those we closed; `_pending` brought up to date."""
        connected = server.connections
        self._closing.intersection_update(connected)
        for handler in connected:
            self._pending.pop(handler, None)
        for handler in [h for h, since in self._pending.items() if now - since > 1.0]:
            del self._pending[handler]  # admitted but never connected (the socket failed): stop counting it
        return [h for h in connected if h not in self._closing]

    def enter(self, request: web.BaseRequest) -> RequestHandler:
        """A request began on its connection: no longer waiting for a head, and busy (never evicted) until
        `leave`. Called by the edge (edge.py) around every handler."""
        protocol = request.protocol
        timer = self._waiting.pop(protocol, None)
        if timer is not None:
            timer.cancel()
        self._busy.add(protocol)
        return protocol

    def leave(self, protocol: RequestHandler) -> None:
        """The request that `enter` returned `protocol` for has its answer."""
        self._busy.discard(protocol)

    def _evict_idle(self, live: list[RequestHandler], count: int) -> int:
        """Close up to `count` of the oldest connections with no request in progress; how many were closed.

        More than one after a burst: otherwise the burst's excess over the cap would stay for good.
        """
        idle = [h for h in live if h not in self._busy][:count]  # the server lists connections oldest first
        for handler in idle:
            self._close(handler, "evicted")
        return len(idle)

    def _too_slow(self, handler: RequestHandler) -> None:
        self._waiting.pop(handler, None)
        if handler not in self._busy and handler.transport is not None:
            self._close(handler, "header_timeout")

    def _close(self, handler: RequestHandler, why: str) -> None:
        timer = self._waiting.pop(handler, None)
        if timer is not None:
            timer.cancel()
        self._closing.add(handler)
        handler.force_close()
        self._count(why)

    def _count(self, why: str) -> None:
        if self._metrics is not None:
            self._metrics.connections_closed.labels(why).inc()


class GuardedRunner(web.AppRunner):
    """An AppRunner whose sites accept connections through a ConnectionGuard."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    @property
    def server(self) -> web.Server | None:
        """What the sites hand to `create_server`: the guard's factory in front of aiohttp's server."""
        inner = super().server
        return None if inner is None else self.guard.factory(inner)  # type: ignore[return-value]  # a factory is all a site calls


class AcceptErrors:
    """A loop exception handler: a failed accept() is logged at most once per `interval` with a count of how
    many failed since the last line; every other context goes to the handler that was there before."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics | None = None, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        self._metrics = metrics
        self._interval = interval
        self._clock = clock
        self._unsaid = 0
        self._said_at = float("-inf")
        self._flush: asyncio.TimerHandle | None = None
        self._error = "?"

    def install(self) -> None:
        self._loop.set_exception_handler(self)

    def uninstall(self) -> None:
        self._loop.set_exception_handler(self._previous)
        if self._flush is not None:
            self._flush.cancel()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_FAILED:
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        err = context.get("exception")
        self._error = errno.errorcode.get(getattr(err, "errno", None) or 0, type(err).__name__)
        self._unsaid += 1
        if self._metrics is not None:
            self._metrics.accept_errors.inc()
        if self._clock() - self._said_at >= self._interval:
            self._say()
        elif self._flush is None:  # the rest of this second is said once it is over
            self._flush = loop.call_later(self._interval, self._say)

    def _say(self) -> None:
        self._flush = None
        if self._unsaid:
            event(log, "accept.failed", level=logging.ERROR, error=self._error, count=self._unsaid,
                  hint="out of file descriptors: raise LimitNOFILE or lower AMO_MAX_CONNECTIONS")
            self._unsaid = 0
            self._said_at = self._clock()
