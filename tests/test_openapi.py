"""The OpenAPI description covers every route the app registers, and is served at /openapi.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from amo_gateway.app import create_app
from amo_gateway.edge import not_routed
from amo_gateway.openapi import spec
from amo_gateway.settings import Settings
from amo_gateway.vault import KeyRing
from tests.conftest import Rig

ANY_METHOD = {"get", "post", "put", "patch", "delete"}  # what a "*" route (the proxy) must describe


def _registered(tmp_path: Path) -> set[tuple[str, str]]:
    """(path template, method) of every route the real app registers (HEAD twins of GETs left out)."""
    settings = Settings.model_validate({"vault_path": tmp_path / "v" / "vault.enc"})
    app = create_app(settings, keys=KeyRing([Fernet.generate_key().decode()]), run_refresher=False)
    found: set[tuple[str, str]] = set()
    for route in app.router.routes():
        if getattr(route.handler, "__wrapped__", None) is not_routed:
            continue  # the catch-all that answers 404/405 for every other path
        path = route.resource.canonical if route.resource is not None else ""
        methods = ANY_METHOD if route.method == "*" else {route.method.lower()}
        found |= {(path, m) for m in methods if m != "head"}
    return found


def _described() -> set[tuple[str, str]]:
    return {(path, method) for path, ops in spec()["paths"].items() for method in ops}


def test_every_registered_route_is_described(tmp_path: Path) -> None:
    """A route added to routes.py without an entry in openapi.json fails here."""
    missing = _registered(tmp_path) - _described()
    assert not missing, f"routes without an OpenAPI entry: {sorted(missing)}"


def test_every_described_route_exists(tmp_path: Path) -> None:
    """The description promises no endpoint the app does not serve."""
    ghosts = _described() - _registered(tmp_path)
    assert not ghosts, f"OpenAPI entries without a route: {sorted(ghosts)}"


def test_every_refusal_is_described_with_the_error_shape() -> None:
    """Each 4xx/5xx answer the gateway makes itself documents the {"error", "detail"} JSON body."""
    error = spec()["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"error", "detail"}
    for path, ops in spec()["paths"].items():
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if status[0] in "45" and path != "/readyz":
                    schema: Any = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, status)


def test_operator_and_consumer_endpoints_declare_bearer_security() -> None:
    """The endpoints that demand a bearer say so, so clients and fuzzers know."""
    paths = spec()["paths"]
    assert "bearer" in spec()["components"]["securitySchemes"]
    for path, method in [("/exchange-api-key", "post"), ("/authorize", "get"), ("/token", "get"),
                         ("/accounts", "get"), ("/proxy/{path}", "get")]:
        assert {"bearer": []} in paths[f"/api/v1/integrations/amo-crm{path}"][method]["security"]


async def test_openapi_json_is_served_without_a_bearer(rig: Rig) -> None:
    """GET /openapi.json answers the packaged description to anyone."""
    resp = await rig.client.get("/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == spec()
