"""Root endpoints: /healthz always, /readyz says why not, /metrics carries the named series."""

from __future__ import annotations

from amo_gateway.typedefs import MANAGER
from tests.conftest import ACCOUNT_ID, RigFactory

SERIES = (
    "amo_gateway_refreshes_total",
    "amo_gateway_access_token_expires_in_seconds",
    "amo_gateway_refresh_token_age_seconds",
    "amo_gateway_proxy_requests_total",
    "amo_gateway_proxy_request_duration_seconds_bucket",
    "amo_gateway_ratelimit_queue_depth",
    "amo_gateway_breaker_state",
)


async def test_healthz_answers_200_without_a_bearer_even_when_not_connected(make_rig: RigFactory) -> None:
    """Process alive is all /healthz says, at the root, outside the public prefix."""
    rig = await make_rig(run_refresher=False)
    resp = await rig.client.get("/healthz")
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})


async def test_readyz_is_503_until_connected_then_200_then_503_with_reauth_reason(make_rig: RigFactory) -> None:
    """Not connected → 503 not_connected; connected → 200; a revoked pair → 503 naming reauth_required."""
    rig = await make_rig(run_refresher=False)
    before = await rig.client.get("/readyz")
    assert (before.status, (await before.json())["reason"]) == (503, "not_connected")
    await rig.connect()
    ready = await rig.client.get("/readyz")
    body = await ready.json()
    assert ready.status == 200 and body["accounts"][str(ACCOUNT_ID)]["expires_in"] > 0
    rig.sandbox.revoke(ACCOUNT_ID)
    data, _ = rig.vault().read()
    tokens = data.accounts[str(ACCOUNT_ID)].tokens
    assert tokens is not None
    await rig.app[MANAGER].refresh(str(ACCOUNT_ID), seen=tokens.access_token)
    after = await rig.client.get("/readyz")
    assert after.status == 503 and (await after.json())["reason"].startswith("reauth_required")


async def test_readyz_reports_a_vault_that_no_longer_decrypts(make_rig: RigFactory) -> None:
    """A vault file replaced by garbage: 503 vault_undecryptable, and the file is left as it is."""
    rig = await make_rig(run_refresher=False)
    await rig.connect()
    rig.settings.vault_path.write_bytes(b"not a fernet token")
    resp = await rig.client.get("/readyz")
    assert (resp.status, (await resp.json())["reason"]) == (503, "vault_undecryptable")
    assert rig.settings.vault_path.read_bytes() == b"not a fernet token"


async def test_metrics_needs_no_bearer_or_the_operators_and_refuses_others(make_rig: RigFactory) -> None:
    """/metrics: 200 bare or with the operator token; 401 with a consumer's or a wrong token."""
    rig = await make_rig(run_refresher=False)
    assert (await rig.client.get("/metrics")).status == 200
    assert (await rig.client.get("/metrics", headers=rig.admin)).status == 200
    consumer = await rig.client.get("/metrics", headers={"Authorization": "Bearer consumer-secret-1"})
    assert consumer.status == 401


async def test_metrics_exposition_holds_every_named_series_after_traffic(make_rig: RigFactory) -> None:
    """After a refresh and a proxied call, each series the issue names is in the exposition, with the account."""
    rig = await make_rig(run_refresher=False)
    await rig.connect()
    data, _ = rig.vault().read()
    tokens = data.accounts[str(ACCOUNT_ID)].tokens
    assert tokens is not None
    await rig.app[MANAGER].refresh(str(ACCOUNT_ID), seen=tokens.access_token)
    assert (await rig.client.get(rig.url("/proxy/api/v4/leads"), headers=rig.admin)).status == 200
    resp = await rig.client.get("/metrics")
    text = await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    for name in SERIES:
        assert name in text, name
    assert f'amo_gateway_refreshes_total{{account="{ACCOUNT_ID}",outcome="refreshed"}} 1.0' in text
    assert f'amo_gateway_proxy_requests_total{{account="{ACCOUNT_ID}",status="200"}} 1.0' in text
    assert f'amo_gateway_breaker_state{{account="{ACCOUNT_ID}"}} 0.0' in text
    assert tokens.access_token not in text


async def test_two_apps_in_one_process_keep_separate_registries(make_rig: RigFactory) -> None:
    """Each app has its own CollectorRegistry: creating a second one raises no duplicate-series error."""
    first = await make_rig(run_refresher=False)
    second = await make_rig(run_refresher=False)
    assert (await first.client.get("/metrics")).status == 200
    assert (await second.client.get("/metrics")).status == 200
