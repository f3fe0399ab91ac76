"""A webhook receiver for the evidence scripts: checks each alert's signature and counts alerts by id.

It runs in the script's own event loop on 127.0.0.1 and is given to the gateways through `env()`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amo_gateway.outbox import outbox_path  # noqa: E402 - the path above makes the package importable
from amo_gateway.webhook import SIGNATURE_HEADER, verify  # noqa: E402


class AlertReceiver:
    """Accepts every correctly signed alert; remembers each distinct one and how often it came."""

    def __init__(self) -> None:
        self.secret = secrets.token_hex(32)
        self.alerts: dict[str, dict[str, Any]] = {}
        self.deliveries = 0
        self.bad_signatures = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/alerts", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # the port chosen

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def env(self) -> dict[str, str]:
        """The gateway settings that point its alerts here (checks every second, retries within 2 s)."""
        return {"AMO_ALERT_WEBHOOK_URL": f"http://127.0.0.1:{self.port}/alerts",
                "AMO_ALERT_WEBHOOK_SECRET": self.secret, "AMO_ALERT_CHECK_INTERVAL": "1",
                "AMO_ALERT_RETRY_MAX": "2"}

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(self.secret, request.headers.get(SIGNATURE_HEADER, ""), body, time.time()):
            self.bad_signatures += 1
            return web.json_response({"error": "bad signature"}, status=401)
        alert = json.loads(body)
        self.deliveries += 1
        self.alerts.setdefault(alert["id"], alert)
        return web.json_response({"ok": True})

    async def drained(self, vault_path: Path, limit: float) -> bool:
        """Wait until the gateway's outbox holds nothing undelivered (False after `limit` seconds).

        Two checks (AMO_ALERT_CHECK_INTERVAL=1) pass first, so a state change just made (the last reconnect)
        has been turned into its alert before the outbox is judged empty.
        """
        await asyncio.sleep(2.5)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:  # the outbox belongs to another process: polling its file
            if not pending(vault_path):
                return True
            await asyncio.sleep(0.2)
        return False

    def figures(self, vault_path: Path) -> dict[str, Any]:
        """Distinct alerts by event and reason, deliveries, redeliveries, bad signatures, left in the outbox."""
        first = [a for a in self.alerts.values() if not a.get("reminder")]
        return {
            "distinct": len(self.alerts), "deliveries": self.deliveries,
            "redelivered": self.deliveries - len(self.alerts), "bad_signatures": self.bad_signatures,
            "by_event": dict(Counter(a["event"] for a in first)),
            "refresh_answer_lost": sum(1 for a in first if a["event"] == "reauth_required"
                                       and a.get("reason_code") == "refresh_answer_lost"),
            "pending_at_end": len(pending(vault_path)),
        }


def pending(vault_path: Path) -> list[dict[str, Any]]:
    """The outbox's undelivered entries, read from its file."""
    try:
        return list(json.loads(outbox_path(vault_path).read_text()).get("pending", []))
    except FileNotFoundError:
        return []
