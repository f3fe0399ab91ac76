"""The sandbox's /api/v4 leads, contacts and companies handlers, and the bearer check every API call passes.

Shapes follow amoCRM's v4 docs: a list is HAL+JSON with `_page`, `_links` (self, next, prev) and
`_embedded.{type}`; an empty list and an unknown id are `204 No Content`; a create answers the new ids with
each item's `request_id`; a refused write is 400 with `validation-errors`. Every href is absolute on the
host the request named (`https://demo.amocrm.ru` upstream; `http://127.0.0.1:8081` under `make run`), as
amoCRM builds them from the host it was called on.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from amo_gateway.sandbox.config import SandboxAccount
from amo_gateway.sandbox.entities import (
    ValidationFailed,
    page_links,
    parse_list_query,
    render,
    self_link,
)
from amo_gateway.sandbox.state import SANDBOX_STATE, OAuthProblem

API_PROBLEM_TYPE = "https://httpstatus.es/401"
HAL = "application/hal+json"
_KIND = "{kind:leads|contacts|companies}"


def bearer_account(request: web.Request) -> SandboxAccount:
    """The host's account when the bearer token is a valid access token of it, else 401."""
    state = request.app[SANDBOX_STATE]
    account = state.account_for_host(request.host)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    refused = state.always_unauthorized(request.path)
    if refused or scheme.lower() != "bearer" or state.access_account(token.strip()) != account.account_id:
        raise OAuthProblem(401, "Unauthorized", title="Unauthorized", type_=API_PROBLEM_TYPE,
                           detail="Access token is invalid or expired")
    return account


def compressed(request: web.Request, answer: web.Response) -> web.Response:
    """gzip (or deflate) for a caller whose Accept-Encoding asks, as amoCRM's nginx does; else as is."""
    if request.app[SANDBOX_STATE].config.gzip_api:
        answer.enable_compression()
    return answer


def _hal(request: web.Request, body: dict[str, Any]) -> web.Response:
    return compressed(request, web.json_response(body, content_type=HAL, dumps=_dumps))


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)


def _origin(request: web.Request) -> str:
    """The scheme and host the caller used: amoCRM writes its links on the host it was asked on."""
    return f"{request.scheme}://{request.host}"


async def _list(request: web.Request) -> web.StreamResponse:
    """GET /api/v4/{kind}: one page; `204 No Content` when nothing is on it."""
    account, kind = bearer_account(request), request.match_info["kind"]
    query = parse_list_query(request.query.items())
    records, more = request.app[SANDBOX_STATE].entities.select(account.account_id, kind, query)
    if not records:
        return web.Response(status=204)
    origin = _origin(request)
    return _hal(request, {
        "_page": query.page, "_links": page_links(request.rel_url, origin, query.page, query.limit, more),
        "_embedded": {kind: [render(r, kind, origin, query.with_) for r in records]}})


async def _one(request: web.Request) -> web.StreamResponse:
    """GET /api/v4/{kind}/{id}: the entity, or `204 No Content` for an id the account does not hold."""
    account, kind = bearer_account(request), request.match_info["kind"]
    record = request.app[SANDBOX_STATE].entities.get(account.account_id, kind, int(request.match_info["id"]))
    if record is None:
        return web.Response(status=204)
    with_ = parse_list_query(request.query.items()).with_
    return _hal(request, render(record, kind, _origin(request), with_))


async def _write(request: web.Request) -> web.StreamResponse:
    """POST (create) or PATCH (update) /api/v4/{kind}: a JSON array; the ids back with each `request_id`."""
    account, kind = bearer_account(request), request.match_info["kind"]
    items = await _json_array(request)
    state, now = request.app[SANDBOX_STATE], int(request.app[SANDBOX_STATE].clock())
    write = state.entities.create if request.method == "POST" else state.entities.update
    results = write(account.account_id, account.current_user_id, kind, items, now)
    origin = _origin(request)
    answers = [r | {"_links": self_link(origin, f"/api/v4/{kind}/{r['id']}")} for r in results]
    return _hal(request, {"_links": self_link(origin, f"/api/v4/{kind}"), "_embedded": {kind: answers}})


async def _patch_one(request: web.Request) -> web.StreamResponse:
    """PATCH /api/v4/{kind}/{id}: one object; answers its id, updated_at and self link."""
    account, kind = bearer_account(request), request.match_info["kind"]
    item = await _json(request)
    if not isinstance(item, dict):
        raise ValidationFailed("0", "InvalidType", "", "the body must be an object")
    state = request.app[SANDBOX_STATE]
    item = item | {"id": int(request.match_info["id"])}
    done = state.entities.update(account.account_id, account.current_user_id, kind, [item], int(state.clock()))[0]
    return _hal(request, {"id": done["id"], "updated_at": done["updated_at"],
                          "_links": self_link(_origin(request), f"/api/v4/{kind}/{done['id']}")})


async def _json(request: web.Request) -> Any:
    """The request's JSON; amoCRM's 400 problem when it is none."""
    try:
        return json.loads(await request.read())
    except ValueError:
        raise OAuthProblem(400, "Bad Request", title="Bad Request", type_="https://httpstatus.es/400",
                           detail="The body is not valid JSON") from None


async def _json_array(request: web.Request) -> list[Any]:
    """A non-empty JSON array of items, as amoCRM's batch endpoints take."""
    items = await _json(request)
    if not isinstance(items, list) or not items:
        raise ValidationFailed("0", "InvalidType", "", "the body must be a non-empty array of objects")
    return items


def validation_problem(failed: ValidationFailed) -> web.Response:
    """amoCRM's 400 problem+json with `validation-errors`."""
    return web.Response(text=_dumps(failed.body()), status=400, content_type="application/problem+json")


def add_entity_routes(router: web.UrlDispatcher) -> None:
    """Register the entity endpoints; their names start `api:` so the upstream rules count them as API calls."""
    router.add_get(f"/api/v4/{_KIND}", _list, name="api:list")
    router.add_post(f"/api/v4/{_KIND}", _write, name="api:create")
    router.add_patch(f"/api/v4/{_KIND}", _write, name="api:update")
    router.add_get(f"/api/v4/{_KIND}/{{id:[0-9]{{1,18}}}}", _one, name="api:get")
    router.add_patch(f"/api/v4/{_KIND}/{{id:[0-9]{{1,18}}}}", _patch_one, name="api:patch")
