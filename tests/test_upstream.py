"""The proxy's upstream client (upstream.py) against a scripted HTTP/1.1 server on a real loopback socket.

The server answers each request with the next scripted reply (raw bytes), records which connection each request
came on, and can close a connection after answering: enough to check keep-alive reuse, when a connection must
not be reused, the one retry on a connection found closed, HEAD, chunked and empty answers, the timeouts and the
errors the proxy maps to 502/504.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from amo_gateway import upstream as upstream_module
from amo_gateway.upstream import ConnectFailed, UpstreamPool, UpstreamProtocolError


@dataclass
class Reply:
    raw: bytes
    close: bool = False  # close the connection right after writing the reply
    delay: float = 0.0


def ok(body: bytes = b"hello", extra: str = "") -> Reply:
    return Reply(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body)


@dataclass
class Scripted:
    """A loopback HTTP/1.1 server that plays `replies` in order, one per request, and records the requests."""

    replies: list[Reply]
    requests: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (connection number, head, body)
    connections: int = 0
    server: asyncio.Server | None = None
    port: int = 0
    handlers: list[tuple[asyncio.Task[None], asyncio.StreamWriter]] = field(default_factory=list)

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task, writer in self.handlers:  # connections the client still keeps alive end with the server
            writer.close()
            task.cancel()
        await asyncio.gather(*(task for task, _ in self.handlers), return_exceptions=True)
        await self.server.wait_closed()

    @property
    def url(self) -> URL:
        return URL(f"http://127.0.0.1:{self.port}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        task = asyncio.current_task()
        assert task is not None
        self.handlers.append((task, writer))
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = await _body(reader, head)
                self.requests.append((number, head, body))
                reply = self.replies.pop(0)
                await asyncio.sleep(reply.delay)
                writer.write(reply.raw)
                await writer.drain()
                if reply.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def _body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lines = head.decode().lower().split("\r\n")
    length = next((int(line.split(":")[1]) for line in lines if line.startswith("content-length:")), None)
    if length is not None:
        return await reader.readexactly(length)
    if "transfer-encoding: chunked" not in lines:
        return b""
    chunks = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return b"".join(chunks)
        chunks.append(chunk[:-2])


async def _get(pool: UpstreamPool, url: URL, method: str = "GET", data: bytes | AsyncIterator[bytes] | None = None,
               read_timeout: float | None = 5.0, **headers: str) -> tuple[int, bytes]:
    resp = await pool.request(method, url, CIMultiDict(headers), data, connect_timeout=2.0, read_timeout=read_timeout)
    try:
        return resp.status, await resp.content.read()
    finally:
        resp.release()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    made = UpstreamPool()
    yield made
    await made.close()


async def test_a_connection_is_reused_for_the_next_request_and_carries_host_and_headers(pool: UpstreamPool) -> None:
    async with Scripted([ok(b"one"), ok(b"two")]) as server:
        assert await _get(pool, server.url / "api/v4/leads" % {"page": "2"}, Authorization="Bearer t") == (200, b"one")
        assert await _get(pool, server.url / "x") == (200, b"two")
    assert [number for number, _, _ in server.requests] == [1, 1]
    first = server.requests[0][1].decode()
    assert first.startswith("GET /api/v4/leads?page=2 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{server.url.port}\r\n" in first and "\r\nAuthorization: Bearer t\r\n" in first


async def test_an_answer_not_read_to_the_end_closes_its_connection(pool: UpstreamPool) -> None:
    async with Scripted([ok(b"x" * 8_000_000), ok(b"next")]) as server:  # far more than the buffers hold
        resp = await pool.request("GET", server.url, CIMultiDict(), None, connect_timeout=2, read_timeout=5)
        assert resp.status == 200
        resp.release()  # the body was never read: the connection cannot carry another answer
        assert await _get(pool, server.url) == (200, b"next")
    assert [number for number, _, _ in server.requests] == [1, 2]


async def test_connection_close_is_honoured(pool: UpstreamPool) -> None:
    async with Scripted([ok(b"a", "Connection: close\r\n"), ok(b"b")]) as server:
        await _get(pool, server.url)
        await _get(pool, server.url)
    assert [number for number, _, _ in server.requests] == [1, 2]


async def test_a_get_on_a_connection_found_closed_is_sent_once_more_on_a_new_one(pool: UpstreamPool) -> None:
    async with Scripted([Reply(ok(b"a").raw, close=True), ok(b"b")]) as server:
        await _get(pool, server.url)
        await asyncio.sleep(0.05)  # the server's FIN arrives, or not yet: either way the GET must succeed
        assert await _get(pool, server.url) == (200, b"b")
    assert [number for number, _, _ in server.requests] == [1, 2]


async def test_a_post_on_a_connection_that_breaks_is_never_resent(pool: UpstreamPool) -> None:
    """The server reads the POST and drops the connection without answering: amoCRM may have acted on it."""
    async with Scripted([ok(b"a"), Reply(b"", close=True), ok(b"never")]) as server:
        await _get(pool, server.url)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await _get(pool, server.url, "POST", b'{"name": "x"}')
    assert [(number, head.split(b" ")[0]) for number, head, _ in server.requests] == [(1, b"GET"), (1, b"POST")]


async def test_head_204_and_chunked_answers(pool: UpstreamPool) -> None:
    chunked = Reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    replies = [ok(b"12345"), chunked, Reply(b"HTTP/1.1 204 No Content\r\n\r\n"), ok(b"after")]
    replies[0] = Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")  # HEAD: the length, no body
    async with Scripted(replies) as server:
        assert await _get(pool, server.url, "HEAD") == (200, b"")
        assert await _get(pool, server.url) == (200, b"hello world")
        assert await _get(pool, server.url, "DELETE") == (204, b"")
        assert await _get(pool, server.url) == (200, b"after")
    assert {number for number, _, _ in server.requests} == {1}  # one connection carried all four


async def test_bodies_go_with_their_length_or_chunked(pool: UpstreamPool) -> None:
    async def stream() -> AsyncIterator[bytes]:
        for part in (b"ab" * 40_000, b"cd" * 40_000):
            yield part

    async with Scripted([ok(), ok(), ok()]) as server:
        await _get(pool, server.url, "POST", b"")
        await _get(pool, server.url, "PATCH", b"[1]")
        await _get(pool, server.url, "POST", stream())
    heads = [head.decode().lower() for _, head, _ in server.requests]
    assert "content-length: 0\r\n" in heads[0] and "content-length: 3\r\n" in heads[1]
    assert "transfer-encoding: chunked\r\n" in heads[2]
    assert [body for _, _, body in server.requests] == [b"", b"[1]", b"ab" * 40_000 + b"cd" * 40_000]


async def test_a_silent_server_times_out_as_a_timeout(pool: UpstreamPool) -> None:
    async with Scripted([Reply(ok().raw, delay=2.0)]) as server:
        with pytest.raises(TimeoutError):
            await _get(pool, server.url, read_timeout=0.3)


async def test_a_closed_port_is_a_connect_failure(pool: UpstreamPool) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(ConnectFailed):
            await _get(pool, URL(f"http://127.0.0.1:{port}/"))


async def test_garbage_is_a_protocol_error_and_a_header_with_a_newline_is_never_sent(pool: UpstreamPool) -> None:
    async with Scripted([Reply(b"NOT HTTP AT ALL\r\n\r\n")]) as server:
        with pytest.raises(UpstreamProtocolError):
            await _get(pool, server.url)
        with pytest.raises(UpstreamProtocolError):
            await _get(pool, server.url, **{"X-Bad": "a\r\nInjected: yes"})
    assert len(server.requests) == 1


async def test_an_idle_connection_past_keepalive_is_not_reused(pool: UpstreamPool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "KEEPALIVE", 0.2)
    async with Scripted([ok(b"a"), ok(b"b")]) as server:
        await _get(pool, server.url)
        await asyncio.sleep(0.3)
        await _get(pool, server.url)
    assert [number for number, _, _ in server.requests] == [1, 2]


async def test_close_closes_the_idle_connections() -> None:
    pool = UpstreamPool()
    seen: list[Callable[[], bool]] = []
    async with Scripted([ok()]) as server:
        await _get(pool, server.url)
        seen.extend(entry.protocol.is_connected for idle in pool._idle.values() for entry in idle)
        assert seen and all(check() for check in seen)
        await pool.close()
        assert not any(check() for check in seen)
