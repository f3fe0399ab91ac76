"""A full disk never costs the pair (headroom.py): a refresh is refused before it is sent, or its result lands.

The vault lives on a small tmpfs mounted in a private mount namespace held by a helper process; this test
process reaches it through `/proc/<helper>/root/…`, so nothing is mounted on the host's own tree.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from amo_gateway.errors import VaultFull
from amo_gateway.tokens import CONNECTED, Account
from amo_gateway.typedefs import MANAGER
from tests.conftest import ACCOUNT_ID, FakeClock, Rig, RigFactory

ACCOUNT = str(ACCOUNT_ID)
LIFETIME = 3600
DISK = "640k"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 640 KiB tmpfs in a private mount namespace; the path this process sees it at."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a private tmpfs")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    script = f'mount -t tmpfs -o size={DISK},mode=0700 tmpfs "$1" && echo ready && exec sleep 600'
    with subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                           str(mount_point)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as helper:
        assert helper.stdout is not None
        ready = helper.stdout.readline().strip() == "ready"
        try:
            if ready:
                yield Path(f"/proc/{helper.pid}/root") / str(mount_point).lstrip("/")
        finally:
            helper.kill()
            problem = helper.communicate()[1].strip()
    if not ready:
        pytest.skip(f"cannot mount a tmpfs here: {problem}")


def fill(directory: Path) -> Path:
    """Write a filler file until the disk refuses another byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (64 * 1024, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


async def _rig(make_rig: RigFactory, disk: Path) -> tuple[Rig, FakeClock]:
    clock = FakeClock()
    rig = await make_rig(clock=clock, run_refresher=False, refresh_margin=600, sandbox_access_ttl=LIFETIME,
                         vault_path=disk / "vault" / "vault.enc")
    await rig.connect()
    return rig, clock


def _stored(rig: Rig) -> Account:
    data, _ = rig.vault().read()
    return data.accounts[ACCOUNT]


async def test_full_disk_refuses_the_refresh_before_sending_and_keeps_the_pair(make_rig: RigFactory,
                                                                              small_disk: Path) -> None:
    """No room for the result: nothing reaches amoCRM, /token says vault_disk_full, the vault keeps its pair."""
    rig, clock = await _rig(make_rig, small_disk)
    before = _stored(rig)
    filler = fill(small_disk)
    clock.advance(LIFETIME + 10)
    resp = await rig.client.get(rig.url("/token"), headers=rig.admin)
    assert resp.status == 503
    body = await resp.json()
    assert body["error"] == "vault_disk_full" and "not sent" in body["detail"]
    assert rig.sandbox.refresh_attempts == 0
    metrics = await (await rig.client.get("/metrics")).text()
    assert f'amo_gateway_refreshes_total{{account="{ACCOUNT}",outcome="refused_disk_full"}} 1.0' in metrics
    after = _stored(rig)
    assert after.tokens == before.tokens and after.status == CONNECTED and after.in_flight is None
    filler.unlink()  # room again: the next call refreshes as usual
    resp = await rig.client.get(rig.url("/token"), headers=rig.admin)
    assert resp.status == 200
    assert rig.sandbox.refresh_attempts == 1
    assert _stored(rig).tokens.refresh_token == rig.sandbox.live_refresh_token(ACCOUNT_ID)  # type: ignore[union-attr]


async def test_a_claim_that_cannot_be_written_is_never_sent(make_rig: RigFactory, small_disk: Path) -> None:
    """Reserve in place but no byte left for the in-flight mark itself: refused, vault whole, nothing sent."""
    rig, _ = await _rig(make_rig, small_disk)
    before = _stored(rig)
    rig.vault().reserve.ensure()
    fill(small_disk)
    with pytest.raises(VaultFull):
        await rig.app[MANAGER].refresh(ACCOUNT, seen=before.tokens.access_token)  # type: ignore[union-attr]
    assert rig.sandbox.refresh_attempts == 0
    assert _stored(rig) == before
    assert [p.name for p in (small_disk / "vault").iterdir() if ".tmp-" in p.name] == []


async def test_disk_filling_while_amocrm_answers_still_stores_the_new_pair(make_rig: RigFactory, small_disk: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The claim held a reserve; the disk fills during the call; the reserve makes room and the pair lands."""
    rig, _ = await _rig(make_rig, small_disk)
    before = _stored(rig)
    manager = rig.app[MANAGER]
    answer = manager.client.token_from_refresh

    async def answer_then_fill(*args: Any, **kwargs: Any) -> Any:
        body = await answer(*args, **kwargs)
        await asyncio.to_thread(fill, small_disk)  # e.g. logs or another program took the last byte meanwhile
        return body

    manager.client.token_from_refresh = answer_then_fill  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="amo_gateway.vault"):
        outcome = await manager.refresh(ACCOUNT, seen=before.tokens.access_token)  # type: ignore[union-attr]
    assert outcome.result == "refreshed"
    stored = _stored(rig)
    assert stored.status == CONNECTED and stored.in_flight is None
    assert stored.tokens.refresh_token == rig.sandbox.live_refresh_token(ACCOUNT_ID)  # type: ignore[union-attr]
    assert "vault.reserve_spent" in caplog.messages
