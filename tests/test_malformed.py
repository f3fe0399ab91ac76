"""Bad input gets a clear JSON 4xx, never a 5xx, and nothing stored is lost."""

from __future__ import annotations

import pytest

from tests.conftest import LOGIN, Rig


@pytest.mark.parametrize(
    ("body", "content_type", "error"),
    [
        (b"{not json", "application/json", "invalid_json"),
        (b"\xff\xfe\x00", "application/json", "invalid_body"),
        (b"[1, 2]", "application/json", "invalid_body"),
        (b'{"login": 5, "api_key": "k"}', "application/json", "invalid_body"),
        (b'{"login": "a@b.c"}', "application/json", "invalid_body"),
        (b'{"login": "", "api_key": "k"}', "application/json", "invalid_body"),
        (b"", "application/json", "invalid_json"),
    ],
)
async def test_malformed_exchange_bodies_are_400_json(rig: Rig, body: bytes, content_type: str, error: str) -> None:
    """Bad JSON, bad UTF-8, wrong types and missing fields: 400 with a stable error code."""
    resp = await rig.client.post(rig.url("/exchange-api-key"), data=body,
                                 headers={**rig.admin, "Content-Type": content_type})
    assert resp.status == 400
    assert (await resp.json())["error"] == error
    assert rig.sandbox.hits["exchange"] == 0


async def test_huge_body_is_413_json(rig: Rig) -> None:
    """A body over the limit is refused with JSON before it is parsed."""
    resp = await rig.client.post(rig.url("/exchange-api-key"), data=b"x" * 200_000,
                                 headers={**rig.admin, "Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"] == "body_too_large"


async def test_repeated_query_parameters_are_refused(rig: Rig) -> None:
    """Two codes or two states in one callback is an attack shape, not a request."""
    resp = await rig.client.get(rig.url("/callback?code=a&code=b&state=s"))
    assert resp.status == 400
    assert (await resp.json())["error"] == "repeated_parameter"


async def test_bad_utf8_in_query_is_400(rig: Rig) -> None:
    """Percent-encoded invalid UTF-8 never reaches the flows."""
    resp = await rig.client.get(rig.url("/callback?code=%ff%fe&state=%c3%28"))
    assert resp.status == 400
    assert (await resp.json())["error"] in ("invalid_parameter", "invalid_state")


async def test_bad_flag_value_is_400(rig: Rig) -> None:
    """from_exchange must be 0/1."""
    resp = await rig.client.get(rig.url("/callback"), params={"code": "c", "state": "s", "from_exchange": "yes!"})
    assert resp.status == 400


async def test_unknown_path_and_wrong_method_are_json(rig: Rig) -> None:
    """aiohttp's own 404/405 are reshaped as JSON errors."""
    resp = await rig.client.get(rig.url("/nope"))
    assert (resp.status, (await resp.json())["error"]) == (404, "not_found")
    resp = await rig.client.get(rig.url("/exchange-api-key"))
    assert (resp.status, (await resp.json())["error"]) == (405, "method_not_allowed")
    assert resp.headers["Allow"] == "POST" and resp.headers["X-Amo-Gateway-Error"] == "method_not_allowed"
    resp = await rig.client.delete("/healthz")
    assert (resp.status, set(resp.headers["Allow"].split(","))) == (405, {"GET", "HEAD"})


@pytest.mark.parametrize("path", ["/", "/nope/%0A/x", "/%2F%2F", "/api/v1/integrations/amo-crm/tokens",
                                  "/api/v1/integrations/amo-crm/console/static/a/b"])
@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "OPTIONS"])
async def test_every_unrouted_request_gets_the_json_404(rig: Rig, path: str, method: str) -> None:
    """The catch-all behind the edge (edge.not_routed) answers any path and method no route takes."""
    resp = await rig.client.request(method, path)
    assert resp.status == 404
    assert resp.headers["X-Amo-Gateway-Error"] == "not_found"
    assert (await resp.json())["error"] == "not_found"


async def test_malformed_input_leaves_the_stored_pair_alone(rig: Rig) -> None:
    """After a barrage of bad requests the vault is byte for byte the same."""
    await rig.connect()
    before = rig.settings.vault_path.read_bytes()
    for path in ("/callback?code=x&state=y", "/callback?state=y", "/disconnect?account_id=1&client_uuid=x&signature=y",
                 "/test?account=999", "/token?account=a&account=b"):
        resp = await rig.client.get(rig.url(path), headers=rig.admin)
        assert 400 <= resp.status < 500, path
    resp = await rig.client.post(rig.url("/exchange-api-key"), json={"login": LOGIN, "api_key": 1}, headers=rig.admin)
    assert resp.status == 400
    assert rig.settings.vault_path.read_bytes() == before
