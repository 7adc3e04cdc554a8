"""Who is asking: the client's address (X-Forwarded-For only from trusted proxies) and, once
authenticated, the user. Auth, rate limiting and the access log all read the same Identity."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from aiohttp import web

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_HOP = 64


@dataclass(frozen=True)
class UnknownAddress:
    """A client a trusted proxy forwarded for without a usable address (`unknown`, `for=...`, garbage).

    It is judged as coming from outside: inside no network (anonymous pulls, trusted proxies) and
    counted under its own key, never as the proxy it came through. The key is a digest of what the
    proxy wrote, so the hop's length and bytes never reach a table or a log line.
    """

    hop: str

    def __str__(self) -> str:
        return "unknown-" + hashlib.sha256(self.hop.encode(errors="replace")).hexdigest()[:16]


ClientAddress = IPAddress | UnknownAddress


def within(address: ClientAddress, networks: Iterable[IPNetwork]) -> bool:
    """Whether the address is inside any of `networks`; an unknown address never is."""
    return not isinstance(address, UnknownAddress) and any(address in net for net in networks)


@dataclass(frozen=True)
class Identity:
    """A request's client: `user` is None until authentication names one."""

    address: ClientAddress
    user: str | None = None
    groups: frozenset[str] = field(default_factory=frozenset)

    @property
    def key(self) -> str:
        """What limits and logs count by: the user, else the address."""
        return f"user:{self.user}" if self.user else f"ip:{self.address}"


IDENTITY = web.RequestKey("identity", Identity)


class _FormattedOnce:
    """An address that formats itself once: `str()` of an ipaddress object costs a microsecond, and a
    request's address is formatted for its rate-limit key, its login throttle and its access line."""

    def __init__(self, address: str | int) -> None:
        super().__init__(address)  # type: ignore[call-arg]  # the ipaddress class this is mixed into
        self._text = super().__str__()

    def __str__(self) -> str:
        return self._text


class _IPv4(_FormattedOnce, ipaddress.IPv4Address):
    pass


class _IPv6(_FormattedOnce, ipaddress.IPv6Address):
    pass


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> IPAddress | None:
    """An address; an IPv4-mapped IPv6 one (a dual-stack socket's) as the IPv4 address it is. Remembered:
    every request parses its peer's address, and a busy mirror has few peers."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return _IPv4(int(mapped)) if mapped is not None else _IPv6(text)
    return _IPv4(text)


def parse_hop(text: str) -> IPAddress | None:
    """An X-Forwarded-For hop: `ip`, `ip:port` (IPv4), `[ipv6]` or `[ipv6]:port`; None for anything else
    (and for anything longer than an address with a port and a short zone can be: it becomes a key)."""
    text = text.strip()
    if len(text) > MAX_HOP:
        return None
    if text.startswith("["):
        inside, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and port[1:].isdigit())):
            return None
        parsed = _parse_ip(inside)
        return parsed if ":" in inside else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        parsed = _parse_ip(host)
        return parsed if isinstance(parsed, ipaddress.IPv4Address) and port.isdigit() else None
    return _parse_ip(text)


def client_address(request: web.BaseRequest, trusted: Sequence[IPNetwork]) -> ClientAddress:
    """The peer address, or the address a trusted proxy says it forwarded for.

    X-Forwarded-For is read right to left and only while each hop is a trusted proxy, so a
    client cannot spoof its address by sending the header itself. A hop that is not an address
    stops the walk as an UnknownAddress: falling back to the proxy's own address would let every
    client behind it in as the proxy (inside the anonymous networks, one shared rate-limit key).
    """
    peer = _parse_ip((request.remote or "").strip("[]")) or ipaddress.ip_address("0.0.0.0")
    if not within(peer, trusted) or "X-Forwarded-For" not in request.headers:
        return peer
    hops = [h for part in request.headers.getall("X-Forwarded-For") for h in part.split(",")]
    address: ClientAddress = peer
    for hop in reversed(hops):
        parsed = parse_hop(hop)
        if parsed is None:
            return UnknownAddress(hop.strip())
        address = parsed
        if not within(parsed, trusted):
            break
    return address
