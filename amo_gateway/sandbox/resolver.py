"""A DNS resolver that sends every account host to the sandbox on 127.0.0.1 (tests and benchmarks)."""

from __future__ import annotations

import socket

from aiohttp.abc import AbstractResolver, ResolveResult


class LoopbackResolver(AbstractResolver):
    """Every host (acme.amocrm.ru, api-b.amocrm.ru, …) resolves to 127.0.0.1, where the sandbox listens."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        return None
