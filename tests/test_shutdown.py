"""SIGTERM in the middle of a refresh: the gateway waits for the answer and stores it before it exits."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from _harness import Harness  # the evidence scripts' process harness, reused here


@pytest.mark.slow
async def test_sigterm_during_a_refresh_leaves_the_new_pair_stored(tmp_path: Path) -> None:
    """The refresh request is on the wire when SIGTERM arrives: exit 0, and the vault holds the live pair."""
    async with Harness(tmp_path, access_ttl=6) as rig:
        await rig.start()
        await rig.connect()
        await rig.faults(delay={"token": 1.5})  # amoCRM is slow to answer this refresh
        before = (await rig.stats())["hits"].get("token", 0)
        for _ in range(400):  # the refresh falls due at half the 6 s lifetime
            if (await rig.stats())["hits"].get("token", 0) > before:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("no refresh was sent")
        proc = rig.procs.pop(0)
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), timeout=15) == 0
        stats = await rig.stats()
        assert stats["refresh_attempts"] == 1, "the refresh reached amoCRM and was answered"
        refresh_token, marker, status = rig.vault_refresh()
        assert status == "connected" and marker is None
        assert await rig.is_live(refresh_token), "the vault holds the pair amoCRM issued, not the spent one"
