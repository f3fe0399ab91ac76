"""Structured logs, one event per line (JSON or logfmt), and an access log that never writes a query string."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from amo_gateway.forwarded import CLIENT_ADDRESS

_RESERVED = set(logging.makeLogRecord({}).__dict__)


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


class AccessLogger(AbstractAccessLogger):
    """Method, path WITHOUT query (the callback's carries code and state), status, size, duration, client."""

    @property
    def enabled(self) -> bool:
        """aiohttp skips the access log entirely (no per-request call) when INFO is off."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        event(
            self.logger,
            "http.access",
            method=request.method,
            path=request.path,
            status=response.status,
            bytes=response.body_length,
            ms=round(time * 1000, 2),
            remote=request.get(CLIENT_ADDRESS, request.remote),  # behind nginx: the client, not nginx
        )
