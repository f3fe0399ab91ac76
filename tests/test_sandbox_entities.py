"""The sandbox's leads, contacts and companies behave as amoCRM's v4 API does, so client libraries prove something."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from amo_gateway.accounts import account_subdomain
from amo_gateway.devmode import sandbox_setup
from amo_gateway.sandbox import create_sandbox_app
from amo_gateway.sandbox.entities import ListQuery, parse_list_query
from amo_gateway.settings import PREFIX, Settings
from tests.conftest import RigFactory
from tests.test_sandbox import MAIN_ID, OTHER_ID, bearer, connect, make_config, state_of

Client = TestClient[Any, Any]


@pytest.fixture
async def api(aiohttp_client: Callable[..., Awaitable[Client]]) -> tuple[Client, dict[str, str]]:
    """A sandbox whose accounts start with 7 leads, contacts and companies, and a bearer for `demo`."""
    client = await aiohttp_client(create_sandbox_app(make_config(seed_entities=7, rate_limit=1000)))
    return client, bearer((await connect(client))["access_token"])


async def _json(resp: aiohttp.ClientResponse, status: int = 200) -> Any:
    assert resp.status == status, await resp.text()
    return await resp.json(content_type=None)


async def test_pages_carry_page_and_absolute_self_next_prev_links_on_the_requested_host(api: Any) -> None:
    """limit=3 over 7 leads: pages 1-3 with `_page` and links on the Host asked; page 4 is 204."""
    client, auth = api
    first = await _json(await client.get("/api/v4/leads?limit=3&with=contacts", headers=auth))
    origin = f"http://{client.host}:{client.port}"
    assert first["_page"] == 1 and [x["id"] for x in first["_embedded"]["leads"]] == [1000001, 1000002, 1000003]
    assert first["_links"]["self"]["href"] == f"{origin}/api/v4/leads?with=contacts&page=1&limit=3"
    assert first["_links"]["next"]["href"] == f"{origin}/api/v4/leads?with=contacts&page=2&limit=3"
    assert "prev" not in first["_links"]
    second = await _json(await client.get(URL(first["_links"]["next"]["href"]).path_qs, headers=auth))
    assert second["_page"] == 2 and second["_links"]["prev"]["href"].endswith("page=1&limit=3")
    third = await _json(await client.get("/api/v4/leads?limit=3&page=3", headers=auth))
    assert [x["name"] for x in third["_embedded"]["leads"]] == ["Lead 7"] and "next" not in third["_links"]
    assert (await client.get("/api/v4/leads?limit=3&page=4", headers=auth)).status == 204
    named = await _json(await client.get("/api/v4/companies?limit=1", headers={**auth, "Host": "demo.amocrm.ru"}))
    assert named["_links"]["next"]["href"] == "http://demo.amocrm.ru/api/v4/companies?page=2&limit=1"


async def test_filter_by_id_in_every_bracket_style_and_full_text_query(api: Any) -> None:
    """filter[id][]=…, filter[id][0]=… and filter[id]=… select ids; query= searches names; none matching is 204."""
    client, auth = api
    for query in ("filter[id][]=2000002&filter[id][]=2000005", "filter[id]=2000002,2000005",
                  "filter%5Bid%5D%5B0%5D=2000002&filter%5Bid%5D%5B1%5D=2000005"):
        found = await _json(await client.get(f"/api/v4/contacts?{query}", headers=auth))
        assert [c["id"] for c in found["_embedded"]["contacts"]] == [2000002, 2000005], query
    hits = await _json(await client.get("/api/v4/companies?query=company 6", headers=auth))
    assert [c["name"] for c in hits["_embedded"]["companies"]] == ["Company 6"]
    assert (await client.get("/api/v4/leads?query=no such lead", headers=auth)).status == 204
    assert (await client.get("/api/v4/leads?filter[id][]=1", headers=auth)).status == 204


async def test_get_by_id_and_a_missing_id_is_204(api: Any) -> None:
    """GET /api/v4/leads/{id} answers the lead as hal+json with its self link; an unknown id answers 204."""
    client, auth = api
    resp = await client.get("/api/v4/leads/1000004", headers=auth)
    lead = await _json(resp)
    assert resp.content_type == "application/hal+json"
    assert (lead["id"], lead["name"], lead["price"], lead["account_id"]) == (1000004, "Lead 4", 4000, MAIN_ID)
    assert lead["_links"]["self"]["href"].endswith("/api/v4/leads/1000004")
    assert (await client.get("/api/v4/leads/999", headers=auth)).status == 204
    assert (await client.get("/api/v4/contacts/1000004", headers=auth)).status == 204  # a lead's id, not a contact's


async def test_create_answers_new_ids_with_request_ids_then_update_changes_them(api: Any) -> None:
    """POST answers `_embedded.leads[{id, request_id, _links}]`; PATCH (batch and by id) changes the stored lead."""
    client, auth = api
    made = await _json(await client.post("/api/v4/leads", headers=auth, json=[
        {"name": "Deal", "price": 5, "_embedded": {"contacts": [{"id": 2000001}]}},
        {"name": "Second", "request_id": "mine"}]))
    refs = made["_embedded"]["leads"]
    new, second = refs[0]["id"], refs[1]["id"]
    assert new > 1000014 and second == new + 1  # after both accounts' seeded leads: ids are global
    assert [r["request_id"] for r in refs] == ["0", "mine"]
    assert refs[0]["_links"]["self"]["href"].endswith(f"/api/v4/leads/{new}")
    with_contacts = await _json(await client.get(f"/api/v4/leads/{new}?with=contacts", headers=auth))
    assert [c["id"] for c in with_contacts["_embedded"]["contacts"]] == [2000001]
    changed = await _json(await client.patch("/api/v4/leads", headers=auth, json=[{"id": new, "price": 77}]))
    assert changed["_embedded"]["leads"][0]["id"] == new and "updated_at" in changed["_embedded"]["leads"][0]
    one = await _json(await client.patch(f"/api/v4/leads/{second}", headers=auth, json={"name": "Renamed"}))
    assert one["id"] == second
    leads = await _json(await client.get(f"/api/v4/leads?filter[id][]={new}&filter[id][]={second}", headers=auth))
    assert [(x["name"], x["price"]) for x in leads["_embedded"]["leads"]] == [("Deal", 77), ("Renamed", 0)]


async def test_refusals_have_amocrms_shapes(api: Any) -> None:
    """Wrong types, unknown ids and bad paging are 400 `validation-errors`; a non-JSON body is a 400 problem."""
    client, auth = api
    for method, path, body in [("POST", "/api/v4/leads", [{"name": "x"}, {"price": "cheap"}]),
                               ("PATCH", "/api/v4/leads", [{"id": 42, "name": "x"}]),
                               ("POST", "/api/v4/contacts", {"name": "not a list"})]:
        resp = await client.request(method, path, headers=auth, json=body)
        assert resp.content_type == "application/problem+json"
        problem = await _json(resp, 400)
        assert (problem["status"], problem["title"], problem["type"]) == (400, "Bad Request", "https://httpstatus.es/400")
        assert problem["validation-errors"][0]["errors"][0].keys() == {"code", "path", "detail"}
    assert state_of(client).entities.count(MAIN_ID, "leads") == 7  # the half-valid batch stored nothing
    price = (await _json(await client.post("/api/v4/leads", headers=auth, json=[{"price": "x"}]), 400))
    assert price["validation-errors"][0]["errors"][0]["path"] == "price"
    for bad in ("limit=251", "limit=0", "page=x"):
        assert (await client.get(f"/api/v4/leads?{bad}", headers=auth)).status == 400, bad
    garbled = await client.post("/api/v4/leads", headers={**auth, "Content-Type": "application/json"}, data=b"{")
    assert (await _json(garbled, 400))["detail"] == "The body is not valid JSON"
    assert (await client.get("/api/v4/leads")).status == 401


async def test_accounts_see_only_their_own_entities(api: Any) -> None:
    """Records belong to the account whose host was asked: `other` never lists `demo`'s new lead."""
    client, auth = api
    await _json(await client.post("/api/v4/leads", headers=auth, json=[{"name": "demo only"}]))
    state = state_of(client)
    code = state.issue_code(OTHER_ID)
    other = await client.post("/oauth2/access_token", headers={"Host": "other.amocrm.ru"}, json={
        "client_id": state.config.client_id, "client_secret": state.config.client_secret,
        "grant_type": "authorization_code", "code": code, "redirect_uri": state.config.redirect_uri})
    token = (await other.json())["access_token"]
    found = await client.get("/api/v4/leads?query=demo only", headers=bearer(token, "other.amocrm.ru"))
    assert found.status == 204
    assert (state.entities.count(MAIN_ID, "leads"), state.entities.count(OTHER_ID, "leads")) == (8, 7)


async def test_answers_are_gzipped_only_for_callers_that_ask(api: Any) -> None:
    """Accept-Encoding: gzip gets a gzip body, as amoCRM's nginx sends; identity gets plain JSON."""
    client, auth = api
    zipped = await client.get("/api/v4/leads", headers={**auth, "Accept-Encoding": "gzip"})
    assert zipped.headers.get("Content-Encoding") == "gzip" and (await zipped.json(content_type=None))["_page"] == 1
    plain = await client.get("/api/v4/leads", headers={**auth, "Accept-Encoding": "identity"})
    assert plain.headers.get("Content-Encoding") is None


async def test_entity_calls_count_against_seven_per_second(aiohttp_client: Any) -> None:
    """The eighth entity call within a second answers 429, as every /api/v4 call does."""
    client = await aiohttp_client(create_sandbox_app(make_config()))
    auth = bearer((await connect(client))["access_token"])
    statuses = [(await client.get("/api/v4/contacts", headers=auth)).status for _ in range(8)]
    assert statuses == [200] * 7 + [429]
    assert state_of(client).hits["api"] == 8


def test_list_query_parsing_defaults_and_relations() -> None:
    """Defaults are page 1 and 50 a page; `with` is a comma list; unknown parameters are ignored."""
    assert parse_list_query([]) == ListQuery(1, 50, None, None, ())
    assert parse_list_query([("with", "contacts, companies"), ("order[id]", "desc"), ("limit", "250")]) == \
        ListQuery(1, 250, None, None, ("contacts", "companies"))


def test_sandbox_mode_names_its_account_demo_everywhere(tmp_path: Path) -> None:
    """`make run`'s settings name the account host demo.amocrm.ru, so /accounts says `demo`, never `127`."""
    dev, config = sandbox_setup(Settings.model_validate({"vault_path": tmp_path / "v.enc"}), tmp_path / "dev")
    assert dev.account_base_url == "http://127.0.0.1:8081"
    assert account_subdomain(dev.account_base_url, dev) == config.accounts[0].subdomain == "demo"


async def test_accounts_and_test_agree_on_the_subdomain(make_rig: RigFactory) -> None:
    """With the sandbox reached by address and AMO_DOMAIN naming it, /accounts and /test both say `demo`."""
    rig = await make_rig(domain="demo.amocrm.ru")
    await rig.connect()
    listed = await (await rig.client.get(f"{PREFIX}/accounts", headers=rig.admin)).json()
    tested = await (await rig.client.get(f"{PREFIX}/test", headers=rig.admin)).json()
    assert [a["subdomain"] for a in listed["accounts"]] == [tested["subdomain"]] == ["demo"]
