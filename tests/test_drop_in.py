"""A drop-in amoCRM endpoint: the per-account base URL, and amoCRM's links rewritten to lead back through us."""

from __future__ import annotations

import gzip
import json
from typing import Any

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from amo_gateway.links import LinkRewriter, is_json
from amo_gateway.settings import PREFIX
from amo_gateway.typedefs import PROXY
from tests.conftest import ACCOUNT_ID, Rig, RigFactory

CONSUMER = {"Authorization": "Bearer consumer-secret-1"}
BASE = f"{PREFIX}/accounts/demo/proxy"


async def _rig(make_rig: RigFactory, **overrides: Any) -> Rig:
    """A connected gateway whose account is named demo.amocrm.ru (reached at the sandbox's loopback port)."""
    rig = await make_rig(domain="demo.amocrm.ru", sandbox_seed_entities=5, **overrides)
    await rig.connect()
    return rig


async def _raw(rig: Rig, path: str) -> aiohttp.ClientResponse:
    """GET `path` byte for byte: no client-side normalisation of dots or percent-escapes."""
    url = URL(str(rig.client.make_url("/")).rstrip("/") + path, encoded=True)
    return await rig.client.session.get(url, headers=CONSUMER)


def _gateway(rig: Rig) -> str:
    return f"http://127.0.0.1:{rig.client.port}"


async def test_per_account_base_url_is_the_proxy_with_the_account_chosen(make_rig: RigFactory) -> None:
    """…/accounts/{subdomain or id}/proxy/api/v4/… forwards as …/proxy/… does; the path's account wins."""
    rig = await _rig(make_rig)
    for selector in ("demo", str(ACCOUNT_ID)):
        resp = await rig.client.get(f"{PREFIX}/accounts/{selector}/proxy/api/v4/echo?with=contacts&account=x",
                                    headers={**CONSUMER, "X-Amo-Account": "nobody"})
        assert resp.status == 200, await resp.text()
        echo = await resp.json()
        assert (echo["path"], echo["query"]) == ("/api/v4/echo", "with=contacts")
        assert "x-amo-account" not in {k.lower() for k in echo["headers"]}
    assert (await rig.client.get(f"{BASE}/api/v4/echo")).status == 401
    old_ways = [await rig.client.get(rig.url("/proxy/api/v4/echo"), headers={**CONSUMER, "X-Amo-Account": "demo"}),
                await rig.client.get(rig.url("/proxy/api/v4/echo?account=demo"), headers=CONSUMER)]
    assert [r.status for r in old_ways] == [200, 200]


async def test_per_account_base_url_refuses_what_the_proxy_refuses(make_rig: RigFactory) -> None:
    """Disguised paths 400, paths outside the API 403, a disguised or unknown account 400/404: never sent."""
    rig = await _rig(make_rig)
    sent = rig.sandbox.hits["api"]
    cases = [("api/v4/leads%2f..%2f..%2foauth2/access_token", 400, "bad_proxy_path"),
             ("api/v4/./leads", 400, "bad_proxy_path"), ("api/v4/leads/..", 400, "bad_proxy_path"),
             ("oauth2/access_token", 403, "path_not_proxied"), ("", 403, "path_not_proxied")]
    for tail, status, code in cases:
        resp = await _raw(rig, f"{BASE}/{tail}")
        assert (resp.status, (await resp.json()).get("error")) == (status, code), (tail, await resp.text())
        assert resp.headers["X-Amo-Gateway-Error"] == code
    for selector, status in (("de%6Do", 400), ("-demo", 400), ("de_mo", 400), ("acme", 404)):
        resp = await _raw(rig, f"{PREFIX}/accounts/{selector}/proxy/api/v4/leads")
        assert resp.status == status, selector
    assert rig.sandbox.hits["api"] == sent


async def test_a_rewritten_next_link_followed_with_the_same_bearer_gets_page_two(make_rig: RigFactory) -> None:
    """amoCRM's `next` comes back under the per-account URL; following it through the gateway gets page 2."""
    rig = await _rig(make_rig)
    first = await (await rig.client.get(f"{BASE}/api/v4/leads?limit=2", headers=CONSUMER)).json()
    base = _gateway(rig) + BASE
    assert first["_links"]["next"]["href"] == f"{base}/api/v4/leads?page=2&limit=2"
    assert first["_links"]["self"]["href"] == f"{base}/api/v4/leads?page=1&limit=2"
    assert first["_embedded"]["leads"][0]["_links"]["self"]["href"] == f"{base}/api/v4/leads/1000001"
    nxt = URL(first["_links"]["next"]["href"])
    second = await (await rig.client.get(nxt.path_qs, headers=CONSUMER)).json()
    assert second["_page"] == 2 and [x["name"] for x in second["_embedded"]["leads"]] == ["Lead 3", "Lead 4"]
    assert second["_links"]["prev"]["href"] == f"{base}/api/v4/leads?page=1&limit=2"
    assert rig.sandbox_url not in json.dumps(second)


async def test_plain_proxy_links_name_their_account(make_rig: RigFactory) -> None:
    """Through …/proxy/ the links carry ?account=<id>, so they work without the caller's X-Amo-Account."""
    rig = await _rig(make_rig)
    first = await (await rig.client.get(rig.url("/proxy/api/v4/contacts?limit=3"),
                                        headers={**CONSUMER, "X-Amo-Account": "demo"})).json()
    nxt = first["_links"]["next"]["href"]
    assert nxt == f"{_gateway(rig)}{PREFIX}/proxy/api/v4/contacts?page=2&limit=3&account={ACCOUNT_ID}"
    second = await (await rig.client.get(URL(nxt).path_qs, headers=CONSUMER)).json()
    assert [c["name"] for c in second["_embedded"]["contacts"]] == ["Contact 4", "Contact 5"]


async def test_links_use_the_scheme_and_host_the_trusted_proxy_saw(make_rig: RigFactory) -> None:
    """Behind nginx (a trusted peer, X-Forwarded-Proto/-Host), the links are https://gw.example.com/…."""
    rig = await _rig(make_rig)
    forwarded = {**CONSUMER, "X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example.com",
                 "X-Forwarded-For": "203.0.113.5"}
    page = await (await rig.client.get(f"{BASE}/api/v4/companies?limit=1", headers=forwarded)).json()
    assert page["_links"]["next"]["href"] == f"https://gw.example.com{BASE}/api/v4/companies?page=2&limit=1"


async def test_gzip_answers_are_rewritten_and_still_gzip(make_rig: RigFactory) -> None:
    """amoCRM gzipped the page for a caller that asked: it is decoded, rewritten and compressed again."""
    rig = await _rig(make_rig)
    resp = await rig.client.get(f"{BASE}/api/v4/leads?limit=1", headers={**CONSUMER, "Accept-Encoding": "gzip"},
                                auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    page = json.loads(gzip.decompress(await resp.read()))
    assert page["_links"]["next"]["href"].startswith(_gateway(rig) + BASE)
    plain = await rig.client.get(f"{BASE}/api/v4/leads?limit=1", headers={**CONSUMER, "Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    assert (await plain.json())["_links"]["next"]["href"].startswith(_gateway(rig) + BASE)


async def test_answers_over_the_cap_and_non_json_stream_untouched(make_rig: RigFactory) -> None:
    """Past the rewrite cap the page comes back byte for byte as amoCRM wrote it; an HTML error is never read."""
    rig = await _rig(make_rig)
    one = await rig.client.get(f"{BASE}/api/v4/leads/1000001", headers={**CONSUMER, "Accept-Encoding": "identity"})
    rig.app[PROXY].rewrite_cap = len(await one.read()) + 100  # one lead fits, a page of five does not
    small = await (await rig.client.get(f"{BASE}/api/v4/leads/1000001", headers=CONSUMER)).json()
    assert small["_links"]["self"]["href"].startswith(_gateway(rig) + BASE)
    big = await (await rig.client.get(f"{BASE}/api/v4/leads?limit=5", headers=CONSUMER)).json()
    assert big["_links"]["self"]["href"] == f"{rig.sandbox_url}/api/v4/leads?page=1&limit=5"
    rig.sandbox.fail_next["api"] = [403]
    html = await rig.client.get(f"{BASE}/api/v4/leads", headers=CONSUMER)
    assert html.status == 403 and html.content_type == "text/html"


async def test_an_idempotent_replay_carries_rewritten_links_too(make_rig: RigFactory) -> None:
    """A created lead's self link leads through the gateway, in the first answer and in its replay."""
    rig = await _rig(make_rig)
    keyed = {**CONSUMER, "Idempotency-Key": "create-links"}
    answers = [await rig.client.post(f"{BASE}/api/v4/leads", json=[{"name": "New"}], headers=keyed) for _ in range(2)]
    bodies = [await a.json() for a in answers]
    assert answers[1].headers["Idempotent-Replayed"] == "true" and bodies[0] == bodies[1]
    href = bodies[0]["_embedded"]["leads"][0]["_links"]["self"]["href"]
    assert href == f"{_gateway(rig)}{BASE}/api/v4/leads/{bodies[0]['_embedded']['leads'][0]['id']}"
    assert (await rig.client.get(URL(href).path_qs, headers=CONSUMER)).status == 200


def test_only_hrefs_on_the_account_host_under_the_api_move() -> None:
    """Other hosts, other paths (amoCRM's UI), other keys, escaped slashes and non-JSON bodies: as they came."""
    links = LinkRewriter(frozenset({"demo.amocrm.ru"}), ("/api/v4/",), "https://gw/a/accounts/demo/proxy")
    body = {"_links": {"self": {"href": "https://demo.amocrm.ru/api/v4/leads/1?with=contacts"},
                       "ui": {"href": "https://demo.amocrm.ru/leads/detail/1"},
                       "other": {"href": "https://evil.amocrm.ru/api/v4/leads/1"}},
            "note": "https://demo.amocrm.ru/api/v4/leads/1", "items": [{"href": "http://DEMO.amocrm.ru/api/v4/x"}]}
    moved = json.loads(links.rewrite(json.dumps(body).replace("/", "\\/").encode()) or b"null")
    assert moved["_links"]["self"]["href"] == "https://gw/a/accounts/demo/proxy/api/v4/leads/1?with=contacts"
    assert moved["_links"]["ui"] == body["_links"]["ui"] and moved["_links"]["other"] == body["_links"]["other"]
    assert moved["note"] == body["note"]
    assert moved["items"][0]["href"] == "https://gw/a/accounts/demo/proxy/api/v4/x"
    pretty = json.dumps({"a": "\u00e9", "_links": {"next": {"href": "https://demo.amocrm.ru/api/v4/leads?page=2\u0026x=1"}}},
                        indent=2).replace("&", "\\u0026").encode()  # PHP-style escapes, pretty-printed
    out = links.rewrite(pretty) or b""
    assert out == pretty.replace(b'"https://demo.amocrm.ru/api/v4/leads?page=2\\u0026x=1"',
                                 b'"https://gw/a/accounts/demo/proxy/api/v4/leads?page=2&x=1"')  # nothing else moved
    assert links.rewrite(b"<html>demo.amocrm.ru</html>") is None
    assert links.rewrite(b'{"_links": {"self": {"href": "https://other.host/api/v4/leads"}}}') is None
    assert [is_json(t) for t in ("application/hal+json", "application/json; charset=utf-8", "text/html", None)] == \
        [True, True, False, False]


_HOSTS = ("demo.amocrm.ru", "DEMO.amocrm.ru", "demo.amocrm.ru:8443", "demo.amocrm.ru.evil", "other.amocrm.ru")


@settings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(["https", "http", "ftp"]), host=st.sampled_from(_HOSTS),
       path=st.sampled_from(["/api/v4/leads", "/api/v4/", "/leads/detail/1", "", "/api/v4/leads/é", "/api/v40"]),
       query=st.sampled_from(["", "?page=2&limit=50", "?q=a%20b", "?x=\"y"]), fragment=st.sampled_from(["", "#top"]),
       extra=st.sampled_from(["", "account=31920194"]),
       base=st.sampled_from(["https://gw/a/accounts/demo/proxy", 'https://g"w\\x/proxy']))
def test_the_fast_path_moves_every_href_exactly_as_the_general_one(scheme: str, host: str, path: str, query: str,
                                                                   fragment: str, extra: str, base: str) -> None:
    """Most hrefs take a shortcut that never decodes them; its bytes must be those of the decode-and-move path."""
    links = LinkRewriter(frozenset({"demo.amocrm.ru", "demo.amocrm.ru:8443"}), ("/api/v4/",), base, extra)
    href = f"{scheme}://{host}{path}{query}{fragment}"
    body = json.dumps({"_links": {"self": {"href": href}}}, ensure_ascii=False).encode()
    moved = links.moved(href)
    expected = body.replace(json.dumps(href, ensure_ascii=False).encode(),
                            json.dumps(moved, ensure_ascii=False).encode()) if moved is not None else None
    assert links.rewrite(body) == expected
