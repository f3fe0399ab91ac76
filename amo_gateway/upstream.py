"""The proxy's upstream client: keep-alive HTTP/1.1 to the account hosts on aiohttp's own protocol and parser.

`aiohttp.ClientSession.request` spends about 120-150 µs of CPU per call on this machine before and after the
bytes move (request object, connector bookkeeping, tracing, the response object); the same call through its
`ResponseHandler` protocol, C parser and `StreamWriter` directly costs about 45 µs (make bench, "Performance"
in the README). The proxy makes one such call per request, so this module keeps only what it needs:

- a pool of idle keep-alive connections per (scheme, host, port), newest first; an idle connection is closed
  after KEEPALIVE seconds, and one that broke while idle is dropped when picked;
- the request head and a bytes body in one write (aiohttp's `StreamWriter`, whose C header serializer
  refuses CR/LF in names and values); a streamed body with the caller's Content-Length, else chunked, with
  back-pressure;
- the response as aiohttp parses it for its own client (`HttpResponseParser`: the same limits, chunked and
  read-until-close bodies, HEAD and 204/304 without one), its body an aiohttp `StreamReader` read as it
  arrives, with the read timeout restarted by each arrival (aiohttp's `sock_read`);
- a connection goes back to the pool only when its answer was read to the end and neither side asked to
  close; an idempotent request whose reused connection turned out closed is sent once more on a new one
  (RFC 9112, 9.3.1), as aiohttp's client does;
- errors are aiohttp's client errors, so the proxy's mapping to 502/504 is unchanged: `ConnectFailed`
  (never connected, so nothing reached amoCRM), `aiohttp.ConnectionTimeoutError`,
  `aiohttp.ServerDisconnectedError`, `aiohttp.SocketTimeoutError`, `UpstreamProtocolError`.

Name resolution and TLS are the same as the rest of the gateway's: the aiohttp resolver the app was given
(tests and the sandbox send every host to 127.0.0.1) and a default `ssl` context that verifies certificates.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

KEEPALIVE = 15.0  # seconds an idle connection is kept (aiohttp's connector default)
MAX_IDLE = 64  # idle connections kept per host; more are closed when given back
RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
Payload = bytes | AsyncIterator[bytes] | None
Key = tuple[str, str, int]


class ConnectFailed(aiohttp.ClientConnectionError):
    """The connection could not be opened: the request never left."""


class UpstreamProtocolError(aiohttp.ClientError):
    """amoCRM's answer was not valid HTTP/1.1, or the request could not be written as HTTP."""


@dataclass(eq=False)
class _Idle:
    protocol: ResponseHandler
    since: float


@dataclass
class UpstreamResponse:
    """An answer being read: status, headers and a body stream; `release()` when done with it."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    content: aiohttp.StreamReader
    _pool: UpstreamPool = field(repr=False)
    _key: Key = field(repr=False)
    _protocol: ResponseHandler | None = field(repr=False)
    _keep: bool = field(repr=False)

    def release(self) -> None:
        """Give the connection back when the answer was read whole and may be followed by another; else close."""
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        if self._keep and self.content.is_eof() and not protocol.should_close and protocol.is_connected():
            self._pool.give_back(self._key, protocol)
        else:
            protocol.close()


class UpstreamPool:
    """Keep-alive connections to amoCRM's hosts, and one request at a time on each."""

    def __init__(self, *, resolver: AbstractResolver | None = None, ssl_context: ssl.SSLContext | None = None,
                 read_bufsize: int = 2**16) -> None:
        self._resolver = resolver or aiohttp.DefaultResolver()
        self._own_resolver = resolver is None
        self._ssl = ssl_context
        self._read_bufsize = read_bufsize
        self._idle: dict[Key, deque[_Idle]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(self, method: str, url: URL, headers: CIMultiDict[str], data: Payload, *,
                      connect_timeout: float, read_timeout: float | None) -> UpstreamResponse:
        """Send one request and return once the answer's head has arrived."""
        key: Key = (url.scheme, url.raw_host or "", url.port or (443 if url.scheme == "https" else 80))
        retry = method in RETRY_METHODS and not isinstance(data, AsyncIterator)
        while True:
            protocol, reused = self._take(key)
            if protocol is None:
                protocol = await self._connect(key, connect_timeout)
            try:
                return await self._exchange(key, protocol, method, url, headers, data, read_timeout)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError):
                protocol.close()
                if not (reused and retry):
                    raise
                retry = False  # once: the next connection is a new one
            except BaseException:
                protocol.close()
                raise

    async def _exchange(self, key: Key, protocol: ResponseHandler, method: str, url: URL,
                        headers: CIMultiDict[str], data: Payload, read_timeout: float | None) -> UpstreamResponse:
        protocol.set_response_params(skip_payload=method == "HEAD", auto_decompress=False,
                                     read_timeout=read_timeout, read_bufsize=self._read_bufsize)
        head = CIMultiDict(headers)
        head["Host"] = _host_header(url)
        loop = asyncio.get_running_loop()
        writer = StreamWriter(protocol, loop)
        line = f"{method} {url.raw_path_qs} HTTP/1.1"
        if isinstance(data, AsyncIterator):
            if "Content-Length" not in head:  # the caller's length is kept: the stream is its body as sent
                head["Transfer-Encoding"] = "chunked"
                writer.enable_chunking()
            await writer.write_headers(line, head)
            async for chunk in data:
                await writer.write(chunk)
            await writer.write_eof()
            protocol.start_timeout()  # amoCRM's silence counts from the end of the body, as in aiohttp
        else:
            if data or method in ("POST", "PUT", "PATCH"):
                head["Content-Length"] = str(len(data or b""))
            try:
                await writer.write_headers(line, head)
            except ValueError:  # a CR or LF in a header: never sent
                raise UpstreamProtocolError("a header value cannot be sent") from None
            await writer.write_eof(data or b"")
            protocol.start_timeout()
        try:
            message, payload = await protocol.read()
        except HttpProcessingError:
            raise UpstreamProtocolError("amoCRM's answer was not valid HTTP") from None
        return UpstreamResponse(message.code, message.reason, message.headers, payload, self, key, protocol,
                                not message.should_close)

    def _take(self, key: Key) -> tuple[ResponseHandler | None, bool]:
        """The newest idle connection still open and young enough, else None."""
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            entry = idle.pop()
            if now - entry.since < KEEPALIVE and entry.protocol.is_connected() and not entry.protocol.should_close:
                return entry.protocol, True
            entry.protocol.close()
        return None, False

    def give_back(self, key: Key, protocol: ResponseHandler) -> None:
        """Keep a connection for the next request to the same host."""
        idle = self._idle.setdefault(key, deque())
        if self._closed or len(idle) >= MAX_IDLE:
            protocol.close()
            return
        idle.append(_Idle(protocol, time.monotonic()))
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(KEEPALIVE, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for KEEPALIVE seconds (the oldest sit at the left)."""
        self._sweeper = None
        now = time.monotonic()
        for idle in self._idle.values():
            while idle and now - idle[0].since >= KEEPALIVE:
                idle.popleft().protocol.close()
        if any(self._idle.values()):
            self._sweeper = asyncio.get_running_loop().call_later(KEEPALIVE, self._sweep)

    async def _connect(self, key: Key, within: float) -> ResponseHandler:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(within):
                hosts = await self._resolver.resolve(host, port, family=socket.AF_UNSPEC)
                last: OSError | None = None
                for target in hosts:
                    try:
                        _, protocol = await loop.create_connection(
                            lambda: ResponseHandler(loop), target["host"], target["port"],
                            ssl=self._ssl_context() if scheme == "https" else None,
                            server_hostname=host if scheme == "https" else None)
                        return protocol
                    except OSError as exc:  # ssl.SSLError included
                        last = exc
                raise ConnectFailed(f"cannot connect ({type(last).__name__ if last else 'no address'})")
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError("connecting to amoCRM timed out") from None
        except OSError as exc:  # the resolver's own failure
            raise ConnectFailed(f"cannot resolve ({type(exc).__name__})") from None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def close(self) -> None:
        """Close every idle connection (answers still being read close with their release)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            while idle:
                idle.pop().protocol.close()
        if self._own_resolver:
            await self._resolver.close()


def _host_header(url: URL) -> str:
    """`host` or `host:port` as the URL names it (a default port is left out, as clients do)."""
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    return host if url.port is None or url.is_default_port() else f"{host}:{url.port}"
