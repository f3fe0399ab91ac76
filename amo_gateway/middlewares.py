"""The edge: one middleware around every request. It marks the connection busy (connections.py), applies a
trusted proxy's X-Forwarded-* (forwarded.py), and turns every error into a JSON answer with a stable `error`
code and a human `detail`.

One middleware, not three: aiohttp wraps the handler once per middleware (a partial, a coroutine and its
frame each), and on `GET /token` two layers fewer saved about 3 us of a request's ~60 (README, Performance).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from amo_gateway.connections import ConnectionGuard
from amo_gateway.errors import GatewayError
from amo_gateway.forwarded import TrustedProxyForwarded

log = logging.getLogger("amo_gateway.http")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


GATEWAY_ERROR = "X-Amo-Gateway-Error"  # on every answer the gateway itself refuses with; never on amoCRM's


def error_response(status: int, code: str, detail: str, *, retry_after: int | None = None,
                   **extra: Any) -> web.Response:
    """The one shape of every refusal; the header lets a client tell the gateway's 401/429 from amoCRM's."""
    headers = {GATEWAY_ERROR: code}
    if retry_after:
        headers["Retry-After"] = str(retry_after)
    body = {"error": code, "detail": detail, **extra}
    return web.json_response(body, status=status, headers=headers)


def edge_middleware(guard: ConnectionGuard, forwarded: TrustedProxyForwarded) -> Middleware:
    """The app's only middleware: the guard outermost, then the errors, then the forwarded headers (so a
    malformed X-Forwarded-For is a JSON 400)."""

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        protocol = guard.enter(request)
        try:
            if forwarded.applies(request):
                return await forwarded.resolve(request, handler)
            return await handler(request)
        except GatewayError as err:
            return _refusal(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _http_error(exc)
        except Exception:
            log.exception("http.unhandled", extra={"fields": {"path": request.path, "method": request.method}})
            return error_response(500, "internal_error", "the gateway failed unexpectedly; see its log")
        finally:
            guard.leave(protocol)

    return edge


def _refusal(err: GatewayError) -> web.Response:
    extra = {k: v for k, v in err.extra.items() if k in ("fields", "reason")}
    return error_response(err.status, err.code, err.detail, retry_after=err.retry_after, **extra)


def _http_error(exc: web.HTTPException) -> web.Response:
    answer = error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"), exc.reason)
    if "Allow" in exc.headers:  # a 405 must say which methods the resource takes (RFC 9110)
        answer.headers["Allow"] = exc.headers["Allow"]
    return answer
