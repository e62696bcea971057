"""``X-Forwarded-For``/``-Proto``/``-Host``, honoured only from the ``trusted_proxies``.

Anyone can send these headers; believed from anyone, they let a client choose the host and
scheme of every link the service hands out (and the address it is logged under). So they
count only when the connection comes from a configured proxy, which sets them itself. This
replaces uvicorn's own handling, which trusts 127.0.0.1 by default and knows no Host.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

#: scope key of the host a trusted proxy forwarded (read by ``public_base``)
FORWARDED_HOST = "blockvault.forwarded_host"
# host, IPv4 or [IPv6], with an optional port: anything else is not a host for a link
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: list[str]) -> list[Network]:
    """The ``trusted_proxies`` setting: addresses or CIDR networks; ValueError names a bad
    entry (a typo must not silently trust nobody, or everybody)."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"trusted_proxies: {entry!r} is not an IP address or network"
            ) from None
    return networks


def _trusted(networks: list[Network], host: str | None) -> bool:
    if not host or not networks:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in networks)


def _last(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The value the nearest proxy added: the last item of the last such header."""
    values = [v for k, v in headers if k == name]
    if not values:
        return None
    return values[-1].decode("latin-1").split(",")[-1].strip()


class TrustedProxies:
    """ASGI middleware: rewrites scheme, client and link host from the forwarded headers
    of requests whose direct peer is a trusted proxy; ignores them from anyone else."""

    def __init__(self, app: Any, trusted_proxies: list[str]) -> None:
        self.app = app
        self.networks = parse_networks(trusted_proxies)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            if client and _trusted(self.networks, client[0]):
                self._apply(scope)
        await self.app(scope, receive, send)

    def _apply(self, scope: dict) -> None:
        headers = scope["headers"]
        proto = _last(headers, b"x-forwarded-proto")
        if proto and proto.lower() in ("http", "https"):
            scope["scheme"] = proto.lower()
        host = _last(headers, b"x-forwarded-host")
        if host and _HOST.fullmatch(host):
            scope[FORWARDED_HOST] = host
        forwarded_for = [v for k, v in headers if k == b"x-forwarded-for"]
        if forwarded_for:
            # the client is the nearest address that is not one of our proxies
            hops = b",".join(forwarded_for).decode("latin-1").split(",")
            for hop in reversed([h.strip() for h in hops if h.strip()]):
                if not _trusted(self.networks, hop):
                    scope["client"] = (hop, 0)
                    break
