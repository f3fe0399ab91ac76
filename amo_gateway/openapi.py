"""GET /openapi.json: the packaged OpenAPI 3.1 description of every endpoint, loaded once."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from aiohttp import web


@functools.cache
def spec() -> dict[str, Any]:
    """The parsed description (package data `amo_gateway/openapi.json`); read once per process."""
    text = resources.files("amo_gateway").joinpath("openapi.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@functools.cache
def _body() -> bytes:
    return json.dumps(spec(), ensure_ascii=False).encode()


async def openapi_json(request: web.Request) -> web.Response:
    """The description as JSON; public, it holds no secret."""
    return web.Response(body=_body(), content_type="application/json")
