"""The edge: what every request passes through around its handler. It marks the connection busy
(connections.py), applies a trusted proxy's X-Forwarded-* (forwarded.py), and turns every error into a JSON
answer with a stable `error` code and a human `detail`.

It wraps each route's handler (routes.py) instead of being an aiohttp middleware: with any middleware at all,
aiohttp builds a chain per request and adds its own current-app layer (a coroutine and a frame each), which
cost `GET /token` about 2 us of its ~14 in-process (README, Performance). A path no route serves reaches
`not_routed` through the same edge, as a JSON 404, or a 405 naming the methods its path takes.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

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


class Edge:
    """Wraps a handler in the edge; one instance per app (typedefs.EDGE), for routes added later too."""

    def __init__(self, guard: ConnectionGuard, forwarded: TrustedProxyForwarded) -> None:
        self.guard = guard
        self.forwarded = forwarded

    def __call__(self, handler: Handler) -> Handler:
        """`handler` behind the guard (outermost), then the errors, then the forwarded headers (so that a
        malformed X-Forwarded-For is a JSON 400)."""
        guard, forwarded = self.guard, self.forwarded

        async def edged(request: web.Request) -> web.StreamResponse:
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

        return functools.update_wrapper(edged, handler)


CATCH_ALL = r"/{path:[\s\S]*}"  # routes.py adds it last; aiohttp tries it after every other route (any path)


async def not_routed(request: web.Request) -> web.StreamResponse:
    """A path no other route serves: 405 with Allow when its path takes other methods, else 404."""
    allowed: set[str] = set()
    catch_all = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not catch_all:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def _refusal(err: GatewayError) -> web.Response:
    extra = {k: v for k, v in err.extra.items() if k in ("fields", "reason")}
    return error_response(err.status, err.code, err.detail, retry_after=err.retry_after, **extra)


def _http_error(exc: web.HTTPException) -> web.Response:
    answer = error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"), exc.reason)
    if "Allow" in exc.headers:  # a 405 must say which methods the resource takes (RFC 9110)
        answer.headers["Allow"] = exc.headers["Allow"]
    return answer
