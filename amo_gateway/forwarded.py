"""X-Forwarded-For/-Proto/-Host, believed only when the TCP peer is one of `settings.trusted_proxies`.

aiohttp-remotes has three X-Forwarded middlewares and none fits alone: `XForwardedStrict` answers 400
to every request that does not carry exactly one proxy hop, which would refuse local `/healthz` and
`/metrics` scrapes and the operator's own curl on the box; `XForwardedRelaxed` and `XForwardedFiltered`
never look at the TCP peer, so anyone who reaches the port directly could forge a client address.
So the peer check lives here and the header parsing (one header each, valid addresses, 400 otherwise)
is `XForwardedRelaxed(num=1)`'s: nginx *sets* X-Forwarded-For to `$remote_addr`, so the last entry
is the client. From any other peer the headers are ignored, not refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_remotes import XForwardedRelaxed

from amo_gateway.errors import ConfigError

# The client address as resolved here, kept on the request that aiohttp itself created: the access
# logger is handed that original request, never the clone the handlers see.
CLIENT_ADDRESS = web.RequestKey("client_address", str)

Network = IPv4Network | IPv6Network
_FORWARDED_FOR, _FORWARDED_PROTO, _FORWARDED_HOST = "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"


def parse_proxies(entries: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or networks (`10.0.0.0/8`); a bad entry stops start-up naming AMO_TRUSTED_PROXIES."""
    networks = []
    for entry in entries:
        try:
            networks.append(ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"AMO_TRUSTED_PROXIES: {entry!r} is not an IP address or network") from None
    return tuple(networks)


class TrustedProxyForwarded:
    """Rewrites `request.remote`, `.scheme` and `.host` from X-Forwarded-* sent by a trusted peer only."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self._trusted = parse_proxies(trusted)
        self._parser = XForwardedRelaxed(num=1)
        self._verdicts: dict[str, bool] = {}  # peer address -> trusted; the hot path asks for the same few peers

    def peer_is_trusted(self, peer: str | None) -> bool:
        """True when the TCP peer's address is inside one of the trusted networks (memoised per address)."""
        if peer is None:
            return False
        verdict = self._verdicts.get(peer)
        if verdict is None:
            verdict = self._judge(peer)
            if len(self._verdicts) < 4096:  # bounded: direct clients could present many addresses
                self._verdicts[peer] = verdict
        return verdict

    def _judge(self, peer: str) -> bool:
        if not peer:
            return False  # a UNIX socket or an unknown peer is not a configured proxy
        try:
            address: IPv4Address | IPv6Address = ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
        return any(address in network for network in self._trusted)

    def applies(self, request: web.BaseRequest) -> bool:
        """True when the headers must be applied: a trusted peer that sent at least one of them.

        The headers are asked first, one case-insensitive lookup each (a set intersection would not be
        case-insensitive), written out rather than through any(): a direct request, the hot path's case,
        then costs three lookups and no generator or address check.
        """
        headers = request.headers
        return ((_FORWARDED_FOR in headers or _FORWARDED_PROTO in headers or _FORWARDED_HOST in headers)
                and self.peer_is_trusted(request.remote))

    async def resolve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Run `handler` on a clone of `request` with the forwarded client, scheme and host (aiohttp-remotes'
        parsing: a malformed header raises 400); only when `applies`, so most requests are never cloned."""

        async def resolved(forwarded: web.Request) -> web.StreamResponse:
            request[CLIENT_ADDRESS] = forwarded.remote or ""
            return await handler(forwarded)

        return await self._parser.middleware(request, resolved)
