"""The proxy's closed doors (issue 9): only amoCRM's API, only plain paths, a 401 refresh budget, bounded replays."""

from __future__ import annotations

import gzip
import json
import re
from typing import Any

import aiohttp
import pytest
from yarl import URL

from amo_gateway.audit import audit_path
from amo_gateway.settings import PREFIX
from amo_gateway.tokens import CONNECTED
from amo_gateway.typedefs import AUDIT
from tests.conftest import ACCOUNT_ID, Rig, RigFactory

CONSUMER = {"Authorization": "Bearer consumer-secret-1"}
DENIED = "/api/v4/leads/7/forbidden"  # a path the sandbox answers 401 whatever the token


async def _connected(make_rig: RigFactory, **overrides: Any) -> Rig:
    rig = await make_rig(run_refresher=False, **overrides)
    await rig.connect()
    return rig


async def _raw(rig: Rig, method: str, tail: str, **kwargs: Any) -> aiohttp.ClientResponse:
    """Send `…/proxy/{tail}` byte for byte: no client-side normalisation of dots or percent-escapes."""
    root = str(rig.client.make_url("/")).rstrip("/")
    url = URL(f"{root}{PREFIX}/proxy/{tail}", encoded=True)
    return await rig.client.session.request(method, url, headers={**CONSUMER, **kwargs.pop("headers", {})},
                                            **kwargs)


async def _audit(rig: Rig) -> list[dict[str, Any]]:
    await rig.app[AUDIT].flush()
    text = audit_path(rig.settings.vault_path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


async def _metric(rig: Rig, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when the series has none yet)."""
    text = await (await rig.client.get("/metrics")).text()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        found = re.fullmatch(rf"{name}(?:\{{(.*)\}})?", series)
        if found and ",".join(sorted((found.group(1) or "").split(","))) == wanted:
            return float(value)
    return 0.0


def _problem_401(body: dict[str, Any]) -> bool:
    return body.get("status") == 401 and body.get("title") == "Unauthorized"


async def test_only_amocrm_api_is_forwarded_the_rest_refused_audited_and_never_sent(make_rig: RigFactory) -> None:
    """oauth2/access_token, the sandbox's own /_sandbox/stats and /api/v2 get 403 path_not_proxied, cost nothing."""
    rig = await _connected(make_rig)
    before = dict(rig.sandbox.hits), rig.sandbox.refresh_attempts
    for method, tail in (("POST", "oauth2/access_token"), ("GET", "_sandbox/stats"), ("GET", "api/v2/leads"),
                         ("GET", "oauth2/account/current/subdomain"), ("GET", "api/v4"), ("GET", "API/v4/leads")):
        resp = await _raw(rig, method, tail, json={"grant_type": "refresh_token"} if method == "POST" else None)
        body = await resp.json()
        assert (resp.status, body["error"]) == (403, "path_not_proxied"), (tail, body)
        assert "/api/v4/" in body["detail"]
    assert (dict(rig.sandbox.hits), rig.sandbox.refresh_attempts) == before
    refused = [line for line in await _audit(rig) if line["event"] == "proxy.refused"]
    assert len(refused) == 6
    assert refused[0]["consumer"] == "crm-sync" and refused[0]["reason"] == "path_not_proxied"
    assert refused[0]["path"] == f"{PREFIX}/proxy/oauth2/access_token"
    assert await _metric(rig, "amo_gateway_proxy_refused_total", reason="path_not_proxied") == 6
    ok = await _raw(rig, "GET", "api/v4/leads?limit=5")
    assert ok.status == 200


async def test_a_setting_adds_api_prefixes(make_rig: RigFactory) -> None:
    """AMO_PROXY_PATHS=/api/v4/,/api/v2/ lets /api/v2 through to the account host; others stay refused."""
    rig = await _connected(make_rig, proxy_paths="/api/v4/,/api/v2/")
    v2 = await _raw(rig, "GET", "api/v2/account")
    assert v2.status == 404 and v2.content_type == "text/plain"  # the sandbox's own answer: it has no /api/v2
    assert (await _raw(rig, "GET", "oauth2/access_token")).status == 403


async def test_disguised_paths_get_400_and_never_reach_amocrm(make_rig: RigFactory) -> None:
    """Encoded /, \\ and . (any case), dot segments, backslashes and encoded controls: 400 bad_proxy_path."""
    rig = await _connected(make_rig)
    before = dict(rig.sandbox.hits)
    for tail in ("api/v4/leads%2f..%2f..%2f..%2f..%2ftest", "api/v4/leads%2F..%2Fcallback", "api/v4/a%2fb",
                 "api/v4/leads%5c..%5ctest", "api/v4/leads%5Cx", "api/v4/%2e%2e/oauth2/access_token",
                 "api/v4/%2E/leads", "api/v4/leads/%2e", "api/v4/./leads", "api/v4/leads/../../oauth2/access_token",
                 "api/v4/leads/..", "api/v4/leads\\..\\x", "api/v4/leads%00", "api/v4/leads%0d%0aX-Evil:%201",
                 "api/v4/leads%7F", "api/v4/leads%1b"):
        resp = await _raw(rig, "GET", tail)
        body = await resp.json()
        assert (resp.status, body["error"]) == (400, "bad_proxy_path"), (tail, resp.status, body)
    assert dict(rig.sandbox.hits) == before
    assert (await _raw(rig, "GET", "api/v4/leads?filter%5Bname%5D=a%2Fb")).status == 200  # queries are free


def test_raw_controls_spaces_and_non_ascii_in_the_path_are_refused() -> None:
    """Bytes aiohttp's parser may let through still never reach amoCRM: the check is on printable ASCII."""
    from amo_gateway.errors import RequestRejected
    from amo_gateway.proxy_paths import forwarded_target

    root = f"{PREFIX}/proxy"
    for bad in ("/api/v4/le\x00ads", "/api/v4/leads\x7f", "/api/v4/le ads", "/api/v4/лиды", "/api/v4/a\tb"):
        try:
            forwarded_target(root + bad, ["/api/v4/"])
        except RequestRejected as err:
            assert err.code == "bad_proxy_path"
        else:
            raise AssertionError(bad)
    assert forwarded_target(f"{root}/api/v4/leads/%D0%BB?x=%2e", ["/api/v4/"]) == "/api/v4/leads/%D0%BB?x=%2e"


async def test_twenty_calls_to_a_path_that_keeps_answering_401_spend_at_most_two_refresh_tokens(
        make_rig: RigFactory) -> None:
    """The issue's bar: GETs and POSTs to an always-401 path get amoCRM's 401; one refresh; still connected."""
    rig = await _connected(make_rig, rate_limit=50, sandbox_rate_limit=50)
    async with rig.client.session.post(f"{rig.sandbox_url}/_sandbox/faults",
                                       json={"unauthorized_paths": [DENIED]}) as switched:
        assert (await switched.json())["unauthorized_paths"] == [DENIED]
    before = rig.sandbox.refresh_attempts
    for i in range(20):
        if i % 2:
            resp = await rig.client.post(rig.url(f"/proxy{DENIED}"), json=[{"n": i}], headers=CONSUMER)
        else:
            resp = await rig.client.get(rig.url(f"/proxy{DENIED}?i={i}"), headers=CONSUMER)
        assert resp.status == 401 and resp.content_type == "application/problem+json"
        assert _problem_401(await resp.json())  # amoCRM's answer as it came, not the gateway's
    spent = rig.sandbox.refresh_attempts - before
    assert spent <= 2, spent
    assert rig.sandbox.refresh_tokens_reused == 0
    data, _ = rig.vault().read()
    assert data.accounts[str(ACCOUNT_ID)].status == CONNECTED
    assert (await rig.client.get(rig.url("/proxy/api/v4/leads"), headers=CONSUMER)).status == 200
    assert await _metric(rig, "amo_gateway_proxy_upstream_401_total", account=str(ACCOUNT_ID),
                         action="budget_closed") == 20 - spent


async def test_an_early_token_death_still_costs_one_refresh_and_the_budget_reopens(make_rig: RigFactory) -> None:
    """A 401 whose retry succeeds was a real early death: the budget reopens, so the next one is healed too."""
    rig = await _connected(make_rig)
    for _ in range(2):
        rig.sandbox.expire_access(ACCOUNT_ID)
        assert (await rig.client.get(rig.url("/proxy/api/v4/leads"), headers=CONSUMER)).status == 200
    assert rig.sandbox.refresh_attempts == 2
    assert await _metric(rig, "amo_gateway_proxy_upstream_401_total", account=str(ACCOUNT_ID),
                         action="refreshed") == 2


async def test_idempotency_answers_stay_under_the_byte_cap_least_recently_used_out(make_rig: RigFactory) -> None:
    """A small AMO_IDEMPOTENCY_MAX_BYTES: old answers lose their bodies (409 on retry, never a second create)."""
    rig = await _connected(make_rig, idempotency_max_bytes=4000, rate_limit=50, sandbox_rate_limit=50)
    url = rig.url("/proxy/api/v4/echo")

    async def post(key: str) -> aiohttp.ClientResponse:  # the sandbox echoes X-Pad: about 1.5 kB an answer
        return await rig.client.post(url, json=[{"name": "x"}],
                                     headers={**CONSUMER, "Idempotency-Key": key, "X-Pad": "p" * 1000})

    assert (await post("k0")).status == 200
    assert (await post("k1")).status == 200
    assert (await post("k0")).headers["Idempotent-Replayed"] == "true"  # k0 is now the most recently used
    assert (await post("k2")).status == 200  # the cap holds two: k1, the least recently used, goes
    sent = rig.sandbox.hits["api"]
    evicted = await post("k1")
    assert (evicted.status, (await evicted.json())["error"]) == (409, "idempotency_conflict")
    assert "evicted" in (await evicted.json())["detail"]
    assert (await post("k0")).headers["Idempotent-Replayed"] == "true"
    assert rig.sandbox.hits["api"] == sent  # neither retry reached amoCRM
    for key in ("k3", "k4", "k5"):
        assert (await post(key)).status == 200
    assert 0 < await _metric(rig, "amo_gateway_idempotency_bytes") <= 4000
    assert await _metric(rig, "amo_gateway_idempotency_evictions_total") == 4


def test_idempotency_store_counts_bytes_exactly_and_evicts_in_lru_order() -> None:
    """Bodies and headers count; a replay refreshes recency; an answer larger than the cap is never kept."""
    from amo_gateway.idempotency import IdempotencyStore

    now = [0.0]
    evictions: list[int] = []
    store = IdempotencyStore(60, 250, clock=lambda: now[0], on_evict=lambda: evictions.append(1))
    headers = (("Content-Type", "application/json"),)  # 12 + 16 + 4 = 32 bytes, so 100 with a 68-byte body
    for key in ("a", "b"):
        assert store.begin("c", key, "fp") is None
        store.finish("c", key, 200, headers, b"x" * 68)
    assert store.size == 2 * 100
    assert store.begin("c", "a", "fp") is not None  # a is now newer than b
    now[0] = 10.0
    assert store.begin("c", "z", "fp") is None
    store.finish("c", "z", 200, headers, b"y" * 68)
    assert (store.size, len(evictions)) == (200, 1)
    assert store.begin("c", "a", "fp") is not None and store.begin("c", "z", "fp") is not None
    assert store.begin("c", "big", "fp") is None
    store.finish("c", "big", 200, headers, b"z" * 300)
    assert store.size == 200
    now[0] = 61.0
    assert store.begin("c", "a", "fp2") is None  # expired: a new request, and its old bytes are gone
    assert store.size == 100


def test_only_gzip_and_deflate_are_decoded_and_never_past_the_limit() -> None:
    """A gzip bomb or an unknown coding is not kept (the key then answers 409), never inflated in memory."""
    import zlib

    from amo_gateway.idempotency import decoded

    enc = (("Content-Encoding", "gzip"), ("Content-Length", "99"), ("X-Id", "1"))
    assert decoded(enc, gzip.compress(b"hello")) == ((("X-Id", "1"),), b"hello")
    assert decoded((("Content-Encoding", "deflate"),), zlib.compress(b"hi")) == ((), b"hi")
    assert decoded(enc, gzip.compress(b"\0" * (2 * 1024 * 1024))) is None
    assert decoded((("Content-Encoding", "br"),), b"\x0b\x02\x80hi\x03") is None
    assert decoded(enc, b"not gzip") is None


async def test_a_replay_honours_its_own_callers_accept_encoding(make_rig: RigFactory) -> None:
    """amoCRM gzipped the first answer; a replay to a caller that never asked for gzip is plain JSON."""
    rig = await _connected(make_rig, sandbox_gzip_api=True)
    url, key = rig.url("/proxy/api/v4/leads"), {**CONSUMER, "Idempotency-Key": "gz-1"}
    first = await rig.client.post(url, json=[{"name": "a"}], headers={**key, "Accept-Encoding": "gzip"})
    assert first.headers.get("Content-Encoding") == "gzip"
    original = await first.read()
    plain = await rig.client.post(url, json=[{"name": "a"}], headers={**key, "Accept-Encoding": "identity"})
    assert plain.headers["Idempotent-Replayed"] == "true"
    assert plain.headers.get("Content-Encoding") is None
    assert await plain.read() == original
    zipped = await rig.client.post(url, json=[{"name": "a"}], headers={**key, "Accept-Encoding": "gzip"})
    assert zipped.headers.get("Content-Encoding") == "gzip"  # re-encoded for a caller that asks
    assert await zipped.read() == original
    assert rig.sandbox.hits["api"] == 1


async def test_public_test_endpoint_spends_refresh_tokens_no_more_freely_than_the_proxy(make_rig: RigFactory) -> None:
    """Anyone may poll /test: with /api/v4/account answering 401 to every token, ten polls cost one refresh."""
    rig = await _connected(make_rig, test_cache_seconds=0)
    rig.sandbox.unauthorized_paths = {"/api/v4/account"}
    before = rig.sandbox.refresh_attempts
    for _ in range(10):
        assert (await rig.client.get(rig.url("/test"))).status == 401
    assert rig.sandbox.refresh_attempts - before == 1
    data, _ = rig.vault().read()
    assert data.accounts[str(ACCOUNT_ID)].status == CONNECTED


def test_proxy_paths_setting_takes_only_plain_prefixes() -> None:
    """AMO_PROXY_PATHS: comma-separated, each /…/; a prefix without its closing / would admit /api/v4x too."""
    from amo_gateway.errors import ConfigError
    from amo_gateway.settings import load_settings

    settings = load_settings(None, environ={"AMO_PROXY_PATHS": "/api/v4/, /api/v2/"})
    assert settings.proxy_paths == ["/api/v4/", "/api/v2/"]
    for bad in ("/api/v4", "api/v4/", "/", "/api/../oauth2/", "/api/%764/", "/api//v4/", "/api\\v4/"):
        with pytest.raises(ConfigError, match="AMO_PROXY_PATHS"):
            load_settings(None, environ={"AMO_PROXY_PATHS": bad})


async def test_only_the_gateways_own_refusals_carry_x_amo_gateway_error(make_rig: RigFactory) -> None:
    """A client can tell who spoke: the gateway's 401 says so in a header, amoCRM's 401 passed back does not."""
    rig = await _connected(make_rig)
    ours = await rig.client.get(rig.url("/proxy/api/v4/leads"))
    assert ours.status == 401
    assert ours.headers["X-Amo-Gateway-Error"] == (await ours.json())["error"] == "unauthorized"
    rig.sandbox.unauthorized_paths = {DENIED}
    theirs = await rig.client.get(rig.url(f"/proxy{DENIED}"), headers=CONSUMER)
    assert theirs.status == 401
    assert "X-Amo-Gateway-Error" not in theirs.headers
    assert await theirs.read() != await ours.read()  # amoCRM's own body, passed back as it came
