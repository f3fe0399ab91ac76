"""Parsing of untrusted input at the edge: every malformed request becomes a 4xx domain error."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from amo_gateway.errors import BadRequest

M = TypeVar("M", bound=BaseModel)
_MAX_PARAM = 2048


class ExchangeBody(BaseModel):
    """The seed's exchange body: `{login, api_key, state?}`."""

    model_config = ConfigDict(extra="ignore", strict=True)

    login: str = Field(min_length=1, max_length=254)
    api_key: str = Field(min_length=1, max_length=512)
    state: str | None = Field(default=None, max_length=512)


def query_param(request: web.Request, name: str, *, required: bool = False) -> str | None:
    """One query parameter: repeated or oversized values are refused, a missing required one too."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"query parameter {name!r} is repeated", code="repeated_parameter")
    if not values or values[0] == "":
        if required:
            raise BadRequest(f"query parameter {name!r} is required", code="missing_parameter")
        return None
    if len(values[0]) > _MAX_PARAM or "\ufffd" in values[0] or "\x00" in values[0]:
        raise BadRequest(f"query parameter {name!r} is too long or not valid UTF-8", code="invalid_parameter")
    return values[0]


def flag(request: web.Request, name: str) -> bool:
    """A 0/1 query flag (`from_exchange=1`)."""
    value = query_param(request, name)
    if value not in (None, "0", "1", "true", "false"):
        raise BadRequest(f"query parameter {name!r} must be 0 or 1", code="invalid_parameter")
    return value in ("1", "true")


async def json_body(request: web.Request, model: type[M]) -> M:
    """The body parsed as JSON and validated against `model`; bad UTF-8, bad JSON or wrong types are 400s."""
    raw = await request.read()
    try:
        data: Any = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("the body is not valid UTF-8", code="invalid_body") from None
    except ValueError:
        raise BadRequest("the body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_body")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in err.errors()})
        raise BadRequest("invalid or missing fields: " + ", ".join(fields), code="invalid_body",
                         fields=fields) from None
