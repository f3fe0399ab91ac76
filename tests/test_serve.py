"""Running the service (serve.py): the event loop it runs on."""

from __future__ import annotations

import asyncio

import uvloop

from amo_gateway.serve import run


def test_the_service_runs_on_uvloop() -> None:
    """serve.run drives the service on uvloop's loop (make bench measured the gain), not asyncio's own."""
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        seen.append(asyncio.get_running_loop())

    run(main())
    assert len(seen) == 1 and isinstance(seen[0], uvloop.Loop)
