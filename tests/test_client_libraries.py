"""Real amoCRM client libraries from PyPI, pointed at the per-account base URL: that is the whole integration.

Each library talks over real sockets to a real gateway, which talks to the sandbox (leads, contacts and
companies with amoCRM's paging, filters, 204s and links). The libraries get the gateway's consumer token as
their "access token"; amoCRM's token never leaves the gateway. Each walks every page, filters, searches,
creates, updates, meets a 204 for a missing id and an empty list.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from aioamocrm import AmoCRMClient, Lead, LongLivedToken, NotFoundError
from amocrm_api import AmoOAuthClient

from amo_gateway.settings import PREFIX
from tests.conftest import Rig, RigFactory

CONSUMER_TOKEN = "consumer-secret-1"  # the rig's consumer `crm-sync`


# --- The patch amocrm-api-wrapper 1.0.1 needs (README, "Using it from your code"). It sends every call as
# `session.<method>(url, json=data)`, and httpx's get() takes no body: every GET raises TypeError, against
# amoCRM as against the gateway. Sessions whose get() drops the (always None) body fix that, nothing else.
class _GetWithoutBody(httpx.Client):
    def get(self, url: Any, *, json: Any = None, **kwargs: Any) -> httpx.Response:
        return super().get(url, **kwargs)


class _AsyncGetWithoutBody(httpx.AsyncClient):
    async def get(self, url: Any, *, json: Any = None, **kwargs: Any) -> httpx.Response:
        return await super().get(url, **kwargs)


class PatchedAmoClient(AmoOAuthClient):
    """AmoOAuthClient whose sessions accept the library's GETs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._session = _GetWithoutBody(headers=self._auth_headers(), timeout=self.timeout)
        self._async_session = _AsyncGetWithoutBody(headers=self._auth_headers(), timeout=self.timeout)

    def _init_session(self, params: dict[str, str] | None = None) -> httpx.Client:
        return _GetWithoutBody(headers={**self._auth_headers(), **(params or {})}, timeout=self.timeout)

    async def _init_async_session(self, params: dict[str, str] | None = None) -> httpx.AsyncClient:
        return _AsyncGetWithoutBody(headers={**self._auth_headers(), **(params or {})}, timeout=self.timeout)
SEEDED = 12  # leads, contacts and companies the sandbox account starts with


@pytest.fixture
async def gateway(make_rig: RigFactory) -> tuple[Rig, str]:
    """A connected gateway and its per-account base URL (what a library's base_url is set to)."""
    rig = await make_rig(domain="demo.amocrm.ru", sandbox_seed_entities=SEEDED)
    await rig.connect()
    return rig, f"http://127.0.0.1:{rig.client.port}{PREFIX}/accounts/demo/proxy"


async def test_aioamocrm_needs_only_base_url(gateway: tuple[Rig, str]) -> None:
    """aioamocrm with base_url= and a long-lived-token auth holding the consumer token: every call works."""
    rig, base = gateway
    async with AmoCRMClient(base_url=base, auth=LongLivedToken(CONSUMER_TOKEN)) as amo:
        first = await amo.leads.get_page(limit=5)
        assert first.next_url == f"{base}/api/v4/leads?page=2&limit=5"  # a link it may follow: through the gateway
        assert amo.owns_url(first.next_url)
        walked = [lead.name async for lead in amo.leads.iterate(limit=5)]
        assert walked == [f"Lead {i}" for i in range(1, SEEDED + 1)]
        picked = [c.id async for c in amo.contacts.iterate(filter={"id": [2000002, 2000011]})]
        assert picked == [2000002, 2000011]
        found = await amo.companies.get_page(query="Company 7")
        assert [c.name for c in found] == ["Company 7"]
        refs = await amo.leads.create([Lead(name="From aioamocrm", price=10), {"name": "Second"}])
        assert len({r.id for r in refs}) == 2 and [r.request_id for r in refs] == ["0", "1"]
        await amo.leads.update([{"id": refs[0].id, "price": 99}])
        lead = await amo.leads.get(refs[0].id)
        assert (lead.name, lead.price) == ("From aioamocrm", 99)
        with pytest.raises(NotFoundError):
            await amo.leads.get(987654321)  # amoCRM's 204 for an unknown id
        assert len(await amo.companies.get_page(query="no company has this name")) == 0  # a 204 list
        assert [c async for c in amo.contacts.iterate(filter={"id": [1]})] == []
    assert rig.sandbox.max_requests_in_window(rig.sandbox.config.accounts[0].account_id) <= 7


async def test_amocrm_api_wrapper_needs_only_crm_url(gateway: tuple[Rig, str]) -> None:
    """amocrm-api-wrapper's AmoOAuthClient (patched above) with crm_url= and the consumer token: every call works."""
    rig, base = gateway
    client = PatchedAmoClient(access_token=CONSUMER_TOKEN, refresh_token="unused: the gateway refreshes",
                            crm_url=base, client_id="unused", client_secret="unused", redirect_uri="unused")
    try:
        walked = [lead["name"] async for lead in client.iter_leads_async(limit=5)]
        assert walked == [f"Lead {i}" for i in range(1, SEEDED + 1)]
        exact = [c["id"] async for c in client.iter_contacts_async(limit=4)]  # 4+4+4, then page 4 is a 204
        assert len(exact) == SEEDED
        picked = await client.get_contacts_async(filters={"id": [2000003, 2000004]})  # filter[id][]=…
        assert [c["id"] for c in picked["_embedded"]["contacts"]] == [2000003, 2000004]
        assert picked["_links"]["self"]["href"].startswith(base)
        found = await client.get_companies_async(query="Company 5")
        assert [c["name"] for c in found["_embedded"]["companies"]] == ["Company 5"]
        made = await client.create_leads_async([{"name": "From the wrapper", "price": 5}])
        new_id = made["_embedded"]["leads"][0]["id"]
        await client.update_leads_async([{"id": new_id, "price": 55}])
        lead: dict[str, Any] = await client.get_lead_async(new_id)
        assert (lead["name"], lead["price"]) == ("From the wrapper", 55)
        assert await client.get_lead_async(987654321) == {}  # 204: the library's "nothing"
        assert await client.get_companies_async(query="no company has this name") == {}
    finally:
        await client.close_async()
        client.close()
    assert rig.sandbox.max_requests_in_window(rig.sandbox.config.accounts[0].account_id) <= 7
