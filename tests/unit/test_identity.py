"""Client addresses: X-Forwarded-For is believed only from trusted proxies."""

from __future__ import annotations

import ipaddress
from typing import Any
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request

from cargohold.identity import Identity, UnknownAddress, client_address, within

PROXIES = [ipaddress.ip_network("10.0.0.0/8")]


def _transport(peer: str) -> mock.Mock:
    """A transport whose connection comes from `peer` (what aiohttp reads request.remote from)."""
    transport = mock.Mock()

    def extra(name: str, default: Any = None) -> Any:
        return (peer, 1234) if name == "peername" else default

    transport.get_extra_info.side_effect = extra
    return transport


def _request(peer: str, forwarded: str | None = None):  # type: ignore[no-untyped-def]
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    return make_mocked_request("GET", "/v2/", headers=headers, transport=_transport(peer))


def test_untrusted_peer_cannot_spoof() -> None:
    assert str(client_address(_request("192.0.2.7", "203.0.113.9"), PROXIES)) == "192.0.2.7"


def test_trusted_proxy_hop_is_skipped() -> None:
    assert str(client_address(_request("10.1.1.1", "203.0.113.9"), PROXIES)) == "203.0.113.9"


def test_chain_stops_at_first_untrusted_hop() -> None:
    # The client wrote 198.51.100.1 itself; the proxy appended the real peer 203.0.113.9.
    req = _request("10.1.1.1", "198.51.100.1, 203.0.113.9, 10.2.2.2")
    assert str(client_address(req, PROXIES)) == "203.0.113.9"


@pytest.mark.parametrize(
    ("hop", "address"),
    [
        ("203.0.113.9:4321", "203.0.113.9"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_hops_with_a_port_are_addresses(hop: str, address: str) -> None:
    assert str(client_address(_request("10.1.1.1", hop), PROXIES)) == address


@pytest.mark.parametrize(
    "forwarded",
    [
        "not-an-ip",
        "unknown",
        "for=203.0.113.9",
        "203.0.113.9, garbage",
        "[2001:db8::1]:x",
        "[10.2.2.2]:1",
        "203.0.113.9:",
        "",
        "fe80::1%" + "x" * 100,
    ],
)
def test_an_unparseable_hop_is_an_unknown_outsider_never_the_proxy(forwarded: str) -> None:
    """Issue 21.4: it used to fall back to the proxy's own address (inside every trusted network)."""
    req = make_mocked_request("GET", "/v2/", headers={"X-Forwarded-For": forwarded}, transport=_transport("10.1.1.1"))
    address = client_address(req, PROXIES)
    assert isinstance(address, UnknownAddress) and not within(address, [ipaddress.ip_network("0.0.0.0/0")])
    assert str(address).startswith("unknown-") and len(str(address)) == 24
    other = client_address(_request("10.1.1.1", "something else"), PROXIES)
    assert Identity(address).key != Identity(other).key != "ip:10.1.1.1"  # its own rate-limit key


def test_identity_key_prefers_user() -> None:
    addr = ipaddress.ip_address("192.0.2.1")
    assert Identity(addr).key == "ip:192.0.2.1"
    assert Identity(addr, user="alice").key == "user:alice"
