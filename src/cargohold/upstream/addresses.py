"""Which addresses an upstream's requests may connect to: no internal ones unless the upstream is one.

A redirect or a token realm names a host; the host name policy (realms.py) says which names may
be asked, this says which *addresses* they may reach. Without it an upstream (or a DNS answer,
or a man in the middle of a plain-HTTP upstream) could make cargohold fetch from loopback,
link-local (cloud metadata at 169.254.169.254), private or unspecified addresses and serve the
answer. The check runs where aiohttp connects: the resolver hands the connector only addresses
that pass, so a name that resolves to a public address when checked and to an internal one when
connecting (DNS rebinding) cannot get through. Literal addresses never reach a resolver, so
`check_literal` is called for them before a request is made.

An upstream that is itself on such an address (a private registry, the test rig on loopback)
may send us to addresses of the same kind: its own kind is learnt from its own host, a literal
address or the addresses its name resolves to. Behind an egress proxy the proxy resolves names
and connects; restrict it there (literal addresses are still checked here).
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

PUBLIC = "public"


class ForbiddenAddress(OSError):
    """A connection to an address the upstream may not send us to (aiohttp reports it as a connect
    error). Its text names the kind of address, never the host (clients may see it)."""


def address_kind(address: str) -> str:
    """public, loopback, link-local, unspecified, multicast or private (any other non-global range)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is no part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    return PUBLIC if ip.is_global else "private"


def literal_address(host: str) -> str | None:
    """`host` when it is an IP address (brackets of an IPv6 URL host removed), else None."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        return None
    return bare


class AddressGuard(AbstractResolver):
    """The resolver of one upstream's session, and the check for literal addresses.

    `upstream_host` resolves as it is (and teaches the guard its kind); so do `exempt` hosts
    (egress proxies, which the operator configured). Every other name keeps only addresses that
    are public or of a kind the upstream itself has; with none left the connection is refused.
    """

    def __init__(
        self, upstream_host: str, exempt: frozenset[str] = frozenset(), inner: AbstractResolver | None = None
    ) -> None:
        self._upstream = upstream_host.lower()
        self._exempt = {host.lower() for host in exempt}
        self._inner = inner or DefaultResolver()
        own = literal_address(self._upstream)
        self._kinds: set[str] = {address_kind(own)} if own is not None else set()
        if self._upstream == "localhost":
            self._kinds.add("loopback")

    def allows(self, address: str) -> bool:
        kind = address_kind(address)
        return kind == PUBLIC or kind in self._kinds

    def check_literal(self, host: str) -> None:
        """Raise ForbiddenAddress for a literal address the upstream may not send us to."""
        address = literal_address(host)
        if address is not None and not self.allows(address):
            raise ForbiddenAddress(f"{address_kind(address)} address refused")

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        name = host.lower().rstrip(".")
        if name == self._upstream:
            self._kinds.update(address_kind(entry["host"]) for entry in found)
            return found
        if name in self._exempt:
            return found
        allowed = [entry for entry in found if self.allows(entry["host"])]
        if not allowed:
            kinds = sorted({address_kind(entry["host"]) for entry in found})
            raise ForbiddenAddress(f"{'/'.join(kinds)} address refused")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
