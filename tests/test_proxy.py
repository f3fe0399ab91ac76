"""The amoCRM proxy end to end against the sandbox: forwarding, bodies, tokens, retries, idempotency keys."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from typing import Any

from multidict import CIMultiDict

from amo_gateway.proxy import _down_headers
from amo_gateway.proxy_paths import forwarded_target
from tests.conftest import ACCOUNT_ID, Rig, RigFactory

CONSUMER = {"Authorization": "Bearer consumer-secret-1"}
OTHER = {"Authorization": "Bearer consumer-secret-2"}


async def _connected(make_rig: RigFactory, **overrides: Any) -> Rig:
    rig = await make_rig(run_refresher=False, **overrides)
    await rig.connect()
    return rig


def _access_token(rig: Rig) -> str:
    data, _ = rig.vault().read()
    tokens = data.accounts[str(ACCOUNT_ID)].tokens
    assert tokens is not None
    return tokens.access_token


async def test_get_reaches_the_account_host_with_query_and_answer_unchanged(make_rig: RigFactory) -> None:
    """GET …/proxy/api/v4/echo?limit=50 arrives as GET /api/v4/echo?limit=50; amoCRM's JSON comes back."""
    rig = await _connected(make_rig)
    resp = await rig.client.get(rig.url("/proxy/api/v4/echo?limit=50&account=31920194"), headers=CONSUMER)
    assert resp.status == 200
    body = await resp.json()
    assert (body["method"], body["path"], body["query"]) == ("GET", "/api/v4/echo", "limit=50")
    leads = await (await rig.client.get(rig.url("/proxy/api/v4/leads?limit=2"), headers=CONSUMER)).json()
    assert [lead["name"] for lead in leads["_embedded"]["leads"]] == ["Lead 1", "Lead 2"]


async def test_callers_need_a_consumer_or_operator_bearer(make_rig: RigFactory) -> None:
    """No bearer or a wrong one: 401 and amoCRM never called; the operator's token works too."""
    rig = await _connected(make_rig)
    assert (await rig.client.get(rig.url("/proxy/api/v4/leads"))).status == 401
    bad = await rig.client.get(rig.url("/proxy/api/v4/leads"), headers={"Authorization": "Bearer nope"})
    assert bad.status == 401
    assert rig.sandbox.api_requests == 0
    assert (await rig.client.get(rig.url("/proxy/api/v4/leads"), headers=rig.admin)).status == 200


async def test_consumer_never_sees_the_access_token_nor_forwards_its_credentials(make_rig: RigFactory) -> None:
    """The answer holds no amoCRM token; the caller's Authorization, Cookie and hop-by-hop headers stay home."""
    rig = await _connected(make_rig)
    headers = {**CONSUMER, "Cookie": "session=abc", "X-Forwarded-For": "10.0.0.9", "TE": "trailers",
               "Connection": "keep-alive, X-Private", "X-Private": "internal", "X-Trace": "t-1"}
    resp = await rig.client.get(rig.url("/proxy/api/v4/echo"), headers=headers)
    text = await resp.text()
    assert _access_token(rig) not in text
    assert all(_access_token(rig) not in v for v in resp.headers.values())
    seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
    assert seen.get("x-trace") == "t-1"
    for name in ("cookie", "x-forwarded-for", "te", "x-private", "x-amo-account"):
        assert name not in seen, name
    assert "consumer-secret-1" not in text


async def test_bodies_of_every_size_arrive_intact(make_rig: RigFactory) -> None:
    """Empty, small, buffered and streamed (over RETRY_BUFFER) bodies, sent together, arrive with their SHA-256."""
    rig = await _connected(make_rig, rate_limit=50, sandbox_rate_limit=50)
    bodies = [b"", b'{"name":"lead"}', os.urandom(200 * 1024), os.urandom(900 * 1024)]  # the sandbox takes up to 1 MiB

    async def send(body: bytes) -> None:
        resp = await rig.client.post(rig.url("/proxy/api/v4/echo"), data=io.BytesIO(body),
                                     headers={**CONSUMER, "Content-Type": "application/octet-stream"})
        echo = await resp.json()
        assert resp.status == 200
        assert (echo["body_length"], echo["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())

    await asyncio.gather(*(send(b) for b in bodies * 2))


async def test_401_mid_burst_causes_exactly_one_refresh(make_rig: RigFactory) -> None:
    """Access tokens die halfway through a burst of GETs: one refresh for all, every caller still gets 200."""
    rig = await _connected(make_rig)
    before = rig.sandbox.refresh_attempts

    async def one(i: int) -> int:
        resp = await rig.client.get(rig.url(f"/proxy/api/v4/leads?i={i}"), headers=CONSUMER if i % 2 else OTHER)
        return resp.status

    burst = asyncio.gather(*(one(i) for i in range(14)))
    await asyncio.sleep(0.4)  # the first 7 have gone; the rest wait for the next second
    assert rig.sandbox.expire_access(ACCOUNT_ID) >= 1
    assert await burst == [200] * 14
    assert rig.sandbox.refresh_attempts - before == 1
    assert rig.sandbox.refresh_tokens_reused == 0


async def test_post_without_idempotency_key_is_never_resent(make_rig: RigFactory) -> None:
    """A POST that meets a 401 is not sent again (the refresh still happens); with a key it is retried.

    Two early deaths back to back are what the 401 refresh budget refuses (test_proxy_hardening.py),
    so it is lifted here (interval 0) to show the resend rules alone."""
    rig = await _connected(make_rig, proxy_refresh_interval=0)
    rig.sandbox.expire_access(ACCOUNT_ID)
    resp = await rig.client.post(rig.url("/proxy/api/v4/leads"), json=[{"name": "x"}], headers=CONSUMER)
    assert resp.status == 401
    assert rig.sandbox.hits["api"] == 1
    assert rig.sandbox.refresh_attempts == 1
    rig.sandbox.expire_access(ACCOUNT_ID)
    keyed = await rig.client.post(rig.url("/proxy/api/v4/leads"), json=[{"name": "x"}],
                                  headers={**CONSUMER, "Idempotency-Key": "k-401"})
    assert keyed.status == 200
    assert rig.sandbox.hits["api"] == 3


async def test_idempotency_key_replays_the_first_answer(make_rig: RigFactory) -> None:
    """A retried POST with the same key and consumer gets the remembered answer; amoCRM sees it once."""
    rig = await _connected(make_rig)
    url, keyed = rig.url("/proxy/api/v4/leads"), {**CONSUMER, "Idempotency-Key": "create-7"}
    first = await rig.client.post(url, json=[{"name": "a"}], headers=keyed)
    second = await rig.client.post(url, json=[{"name": "a"}], headers=keyed)
    assert (first.status, second.status) == (200, 200)
    assert await first.read() == await second.read()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert rig.sandbox.hits["api"] == 1
    other = await rig.client.post(url, json=[{"name": "a"}], headers={**OTHER, "Idempotency-Key": "create-7"})
    assert other.status == 200 and "Idempotent-Replayed" not in other.headers
    misuse = await rig.client.patch(url, json=[{"name": "a"}], headers=keyed)
    assert (misuse.status, (await misuse.json())["error"]) == (409, "idempotency_conflict")


async def test_amocrm_429_is_retried_for_get_but_passed_back_for_post(make_rig: RigFactory) -> None:
    """One injected 429: a GET is retried after a backoff and succeeds; a POST gets the 429 itself."""
    rig = await _connected(make_rig)
    rig.sandbox.fail_next["api"] = [429]
    assert (await rig.client.get(rig.url("/proxy/api/v4/leads"), headers=CONSUMER)).status == 200
    assert rig.sandbox.hits["api"] == 2
    rig.sandbox.fail_next["api"] = [429]
    resp = await rig.client.post(rig.url("/proxy/api/v4/leads"), json={}, headers=CONSUMER)
    assert (resp.status, await resp.text()) == (429, "Too Many Requests")
    assert rig.sandbox.hits["api"] == 3


async def test_slow_amocrm_answer_times_out_as_504(make_rig: RigFactory) -> None:
    """An upstream that does not answer within proxy_timeout gives 504 upstream_unavailable, not a hang."""
    rig = await _connected(make_rig, proxy_timeout=0.3)
    rig.sandbox.delay["api"] = 2.0
    resp = await rig.client.get(rig.url("/proxy/api/v4/leads"), headers=CONSUMER)
    assert (resp.status, (await resp.json())["error"]) == (504, "upstream_unavailable")


async def test_not_connected_answers_503_before_any_upstream_call(make_rig: RigFactory) -> None:
    """With no account stored the proxy says not_connected and calls nobody."""
    rig = await make_rig(run_refresher=False)
    resp = await rig.client.get(rig.url("/proxy/api/v4/leads"), headers=CONSUMER)
    assert (resp.status, (await resp.json())["error"]) == (503, "not_connected")
    assert rig.sandbox.api_requests == 0


def test_target_keeps_the_callers_encoding_drops_account_and_refuses_dot_segments() -> None:
    """The forwarded path and query are the caller's bytes minus `account=`; `..` is refused."""
    root = "/api/v1/integrations/amo-crm/proxy"
    assert forwarded_target(f"{root}/api/v4/leads?filter%5Bname%5D=a%20b&account=demo&x=1", ["/api/v4/"]) == \
        "/api/v4/leads?filter%5Bname%5D=a%20b&x=1"
    for bad in (f"{root}/api/../oauth2/access_token", f"{root}/api/%2e%2e/oauth2"):
        try:
            forwarded_target(bad, ["/api/v4/"])
        except Exception as err:
            assert getattr(err, "code", "") == "bad_proxy_path"
        else:
            raise AssertionError(bad)


def test_answer_headers_lose_hop_by_hop_cookies_and_those_connection_names() -> None:
    """Set-Cookie, Transfer-Encoding, Keep-Alive and headers listed in Connection never reach the caller."""

    class FakeResponse:
        headers = CIMultiDict([("Content-Type", "application/json"), ("Set-Cookie", "s=1"), ("Connection", "X-Hop"),
                               ("X-Hop", "1"), ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"),
                               ("X-Request-Id", "r-9")])

    kept = dict(_down_headers(FakeResponse()))  # type: ignore[arg-type]
    assert kept == {"Content-Type": "application/json", "X-Request-Id": "r-9"}


async def test_a_call_queued_past_its_token_expiry_is_sent_with_a_fresh_token(make_rig: RigFactory) -> None:
    """A call waits in the limiter's queue longer than the token it would have carried lives: amoCRM never sees
    that expired token (no 401, no resend), because the token is taken when the call is admitted, not queued."""
    # 4 s tokens: the sandbox's whole-second `exp` makes one live 3-4 s, the gateway uses it for 3 s (a quarter early)
    rig = await _connected(make_rig, rate_limit=1, rate_guard=0.5, sandbox_access_ttl=4)
    calls = 5  # admitted 1.5 s apart: the last two go out 4.5 and 6 s after the first, past the queued token's life
    answers = await asyncio.gather(*(rig.client.get(rig.url("/proxy/api/v4/leads"), headers=CONSUMER)
                                     for _ in range(calls)))
    assert [a.status for a in answers] == [200] * calls
    assert rig.sandbox.hits["api"] == calls  # one send per call: none was refused 401 and resent
    assert rig.sandbox.refresh_attempts >= 1  # the queue really outlived the first token, refreshed for it
