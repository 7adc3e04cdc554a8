"""Who is asking: the client's address (X-Forwarded-For only from trusted proxies) and, once
authenticated, the user. Auth, rate limiting and the access log all read the same Identity."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Identity:
    """A request's client: `user` is None until authentication names one."""

    address: IPAddress
    user: str | None = None
    groups: frozenset[str] = field(default_factory=frozenset)

    @property
    def key(self) -> str:
        """What limits and logs count by: the user, else the address."""
        return f"user:{self.user}" if self.user else f"ip:{self.address}"


IDENTITY = web.RequestKey("identity", Identity)


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def client_address(request: web.BaseRequest, trusted: Sequence[IPNetwork]) -> IPAddress:
    """The peer address, or the address a trusted proxy says it forwarded for.

    X-Forwarded-For is read right to left and only while each hop is a trusted proxy, so a
    client cannot spoof its address by sending the header itself.
    """
    peer = _parse_ip(request.remote or "") or ipaddress.ip_address("0.0.0.0")
    if not trusted or not any(peer in net for net in trusted):
        return peer
    hops = [h for part in request.headers.getall("X-Forwarded-For", []) for h in part.split(",")]
    address = peer
    for hop in reversed(hops):
        parsed = _parse_ip(hop)
        if parsed is None:
            break
        address = parsed
        if not any(parsed in net for net in trusted):
            break
    return address
