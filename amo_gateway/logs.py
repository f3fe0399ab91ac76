"""Structured logs, one event per line (JSON or logfmt), and an access log that never writes a query string."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from json.encoder import encode_basestring
from typing import Any, ClassVar, NamedTuple, TextIO

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


class AccessLog:
    """The access log's writer: one preformatted line per request, buffered, written to stderr in one call.

    Through `logging`, each request cost a LogRecord, the handler's lock, a formatter building a dict,
    `json.dumps` and a write plus a flush: about a quarter of the CPU of `GET /token`. Here a line is one
    f-string with the same fields, order and escaping as JsonFormatter/LogfmtFormatter, and the lines of up to
    FLUSH_EVERY seconds go out in one write. A timer armed by the first pending line bounds the wait; the
    app's cleanup_ctx (`lifetime`) writes what is left at shutdown. Access lines may therefore reach the
    journal up to FLUSH_EVERY after other events logged later; each carries its own time.
    """

    def __init__(self, fmt: str = "json", stream: TextIO | None = None, *, flush_every: float = FLUSH_EVERY,
                 max_pending: int = MAX_PENDING, clock: Callable[[], float] = time.time) -> None:
        self._line = _json_line if fmt == "json" else _logfmt_line
        self._clock = clock
        self._stream = stream  # None: sys.stderr as it is when written (journald reads it under systemd)
        self._flush_every = flush_every
        self._max_pending = max_pending
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._ts_prefix = ""

    def write(self, logger: str, fields: AccessFields) -> None:
        """Queue one request's line; it is written within FLUSH_EVERY seconds (at once outside an event loop)."""
        self._pending.append(self._line(self._timestamp(self._clock()), logger, fields))
        if len(self._pending) >= self._max_pending:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._flush_every, self.flush)
            except RuntimeError:  # no loop (a script, a test): nothing would ever come back to write it
                self.flush()

    def flush(self) -> None:
        """Write every pending line in one call."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        text, self._pending = "".join(self._pending), []
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

    def logger_class(self) -> type[AccessLogger]:
        """The `access_log_class` for aiohttp, writing here (aiohttp builds one instance per connection)."""

        class BoundAccessLogger(AccessLogger):
            """AccessLogger bound to this sink."""

        BoundAccessLogger.sink = self
        return BoundAccessLogger

    def _timestamp(self, now: float) -> str:
        """JsonFormatter's `ts` for `now`; strftime runs once a second, not once a request."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._ts_prefix}.{int((now - second) * 1000):03d}Z"


class AccessFields(NamedTuple):
    """What the access log says of one request: never the query string, never a header."""

    method: str
    path: str
    status: int
    bytes: int
    ms: float
    remote: str | None


def _json_line(ts: str, logger: str, f: AccessFields) -> str:
    """Byte for byte what JsonFormatter writes for the same event (ensure_ascii=False, default separators)."""
    remote = "null" if f.remote is None else _json_str(f.remote)
    return (f'{{"ts": "{ts}", "level": "info", "logger": {_json_str(logger)}, "event": "{ACCESS_EVENT}", '
            f'"method": {_json_str(f.method)}, "path": {_json_str(f.path)}, "status": {f.status}, '
            f'"bytes": {f.bytes}, "ms": {f.ms!r}, "remote": {remote}}}\n')


def _logfmt_line(ts: str, logger: str, f: AccessFields) -> str:
    """Byte for byte what LogfmtFormatter writes for the same event."""
    return (f"ts={ts} level=info logger={_logfmt_value(logger)} event={ACCESS_EVENT} "
            f"method={_logfmt_value(f.method)} path={_logfmt_value(f.path)} status={f.status} bytes={f.bytes} "
            f"ms={f.ms!r} remote={_logfmt_value(f.remote)}\n")


class AccessLogger(AbstractAccessLogger):
    """Method, path WITHOUT query (the callback's carries code and state), status, size, duration, client."""

    sink: ClassVar[AccessLog]  # set by AccessLog.logger_class: aiohttp constructs this class itself

    @property
    def enabled(self) -> bool:
        """aiohttp skips the access log entirely (no per-request call) when INFO is off."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        # Behind nginx, the client rather than nginx (forwarded.py). A request whose state is empty holds no
        # such key: asking only then spares Mapping.get's KeyError on every direct request.
        remote = request.get(CLIENT_ADDRESS, request.remote) if len(request) else request.remote
        self.sink.write(self.logger.name, AccessFields(request.method, request.path, response.status,
                                                       response.body_length, round(time * 1000, 2), remote))
