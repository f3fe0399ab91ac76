"""Structured logs, one event per line (JSON or logfmt), and an access log that never writes a query string."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from json.encoder import encode_basestring
from typing import Any, NamedTuple, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from amo_gateway.forwarded import CLIENT_ADDRESS

_RESERVED = set(logging.makeLogRecord({}).__dict__)
ACCESS_EVENT = "http.access"
_json_str = encode_basestring  # json.dumps of one str with ensure_ascii=False, minus the encoder's set-up


def event(logger: logging.Logger, name: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event: `name` plus key/value fields. Callers pass fingerprints, never secrets."""
    logger.log(level, name, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_payload(record), default=str, ensure_ascii=False)


class LogfmtFormatter(logging.Formatter):
    """key=value pairs, values quoted when they hold spaces or quotes."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _payload(record).items())


def _payload(record: logging.LogRecord) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": record.getMessage(),
    }
    payload.update(getattr(record, "fields", {}))
    if record.exc_info and record.exc_info[0] is not None:
        payload["error_type"] = record.exc_info[0].__name__
    return payload


def _logfmt_value(value: Any) -> str:
    text = "" if value is None else str(value)
    if not text or any(c in text for c in ' "=\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def configure(fmt: str, level: str) -> None:
    """Send every logger to stderr (journald reads it) in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


FLUSH_EVERY = 0.1  # seconds an access line may wait in memory (what a SIGKILL can lose; the journal keeps its ts)
MAX_PENDING = 512  # lines held at most: a burst is written as soon as it fills this
ACCESS_LOGGER = "aiohttp.access"  # the logger name access lines carry, as aiohttp's own access logger


class AccessFields(NamedTuple):
    """What the access log says of one request: never the query string, never a header."""

    method: str
    path: str
    status: int
    bytes: int
    seconds: float  # how long the request took, from aiohttp (written as "ms", to 0.01 ms)
    remote: str | None


class AccessLog:
    """The access log's writer: one line per request, buffered, formatted and written to stderr in one call.

    Through `logging`, each request cost a LogRecord, the handler's lock, a formatter building a dict,
    `json.dumps` and a write plus a flush: about a quarter of the CPU of `GET /token`. Here a request costs one
    call that reads its six fields and the clock and appends them to a list; the lines of up to FLUSH_EVERY
    seconds are formatted together at flush time (one f-string each, with the same fields, order and escaping
    as JsonFormatter/LogfmtFormatter) and go out in one write. Measured inside the service, a request's `log`
    costs about 3 us and its share of the flush about 2 us, where formatting each line between requests cost
    about 11 (README, Performance). A timer armed by the first pending line bounds the wait; the app's
    cleanup_ctx (`lifetime`) writes what is left at shutdown. Access lines may therefore reach the journal up
    to FLUSH_EVERY after other events logged later; each carries its own time.
    """

    def __init__(self, fmt: str = "json", stream: TextIO | None = None, *, flush_every: float = FLUSH_EVERY,
                 max_pending: int = MAX_PENDING, clock: Callable[[], float] = time.time,
                 logger: str = ACCESS_LOGGER) -> None:
        self._head = _json_head(logger) if fmt == "json" else _logfmt_head(logger)
        self._line = _json_line if fmt == "json" else _logfmt_line
        self._clock = clock
        self._stream = stream  # None: sys.stderr as it is when written (journald reads it under systemd)
        self._flush_every = flush_every
        self._max_pending = max_pending
        self._pending: list[tuple[Any, ...]] = []  # (time.time(), *AccessFields) per line
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._ts_prefix = ""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        """aiohttp's AbstractAccessLogger.log: queue the fields of one request's line (no formatting here).

        Behind nginx the client is the address forwarded.py resolved, not nginx's. A request whose state is
        empty holds no such key: asking only then spares Mapping.get's KeyError on every direct request.
        """
        remote = request.get(CLIENT_ADDRESS, request.remote) if len(request) else request.remote
        pending = self._pending
        pending.append((self._clock(), request.method, request.path, response.status, response.body_length, time,
                        remote))
        if self._timer is None or len(pending) >= self._max_pending:
            self._schedule()

    def write(self, fields: AccessFields) -> None:
        """Queue one line; it is written within FLUSH_EVERY seconds (at once outside an event loop)."""
        self._pending.append((self._clock(), *fields))
        if self._timer is None or len(self._pending) >= self._max_pending:
            self._schedule()

    def _schedule(self) -> None:
        """Write now if the buffer is full (or no event loop would come back to it), else arm the timer once."""
        if len(self._pending) >= self._max_pending:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._flush_every, self.flush)
            except RuntimeError:  # no loop (a script, a test): nothing would ever come back to write it
                self.flush()

    def flush(self) -> None:
        """Format every pending line and write them in one call."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        head, line, stamp = self._head, self._line, self._timestamp
        text = "".join([line(stamp(now), head, *fields) for now, *fields in pending])
        stream = self._stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # stderr gone (closed, journald away): lose the lines, never the requests
            pass

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: nothing to start (the first line arms the timer); at shutdown, write what is pending."""
        yield
        self.flush()

    def logger_class(self) -> type[AbstractAccessLogger]:
        """The `access_log_class` for aiohttp (which builds one instance per connection): its `log` is this
        sink's, so a request costs one Python call. It logs the method and the path WITHOUT the query (the
        callback's carries code and state), the status, size, duration and client."""

        class AccessLogger(AbstractAccessLogger):
            log = staticmethod(self.log)

            @property
            def enabled(self) -> bool:
                """aiohttp skips the access log entirely (no per-request call) when INFO is off."""
                return self.logger.isEnabledFor(logging.INFO)

        return AccessLogger

    def _timestamp(self, now: float) -> str:
        """JsonFormatter's `ts` for `now`; strftime runs once a second, not once a line."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._ts_prefix}.{int((now - second) * 1000):03d}Z"


def _ms(seconds: float) -> float:
    """Milliseconds to two decimals, as round(seconds * 1000, 2) but without its decimal conversion."""
    return int(seconds * 100_000 + 0.5) / 100


def _json_head(logger: str) -> str:
    return f'"level": "info", "logger": {_json_str(logger)}, "event": "{ACCESS_EVENT}", '


def _logfmt_head(logger: str) -> str:
    return f"level=info logger={_logfmt_value(logger)} event={ACCESS_EVENT} "


def _json_line(ts: str, head: str, method: str, path: str, status: int, size: int, seconds: float,
               remote: str | None) -> str:
    """Byte for byte what JsonFormatter writes for the same event (ensure_ascii=False, default separators)."""
    return (f'{{"ts": "{ts}", {head}"method": {_json_str(method)}, "path": {_json_str(path)}, "status": {status}, '
            f'"bytes": {size}, "ms": {_ms(seconds)!r}, "remote": {"null" if remote is None else _json_str(remote)}}}\n')


def _logfmt_line(ts: str, head: str, method: str, path: str, status: int, size: int, seconds: float,
                 remote: str | None) -> str:
    """Byte for byte what LogfmtFormatter writes for the same event."""
    return (f"ts={ts} {head}method={_logfmt_value(method)} path={_logfmt_value(path)} status={status} "
            f"bytes={size} ms={_ms(seconds)!r} remote={_logfmt_value(remote)}\n")
