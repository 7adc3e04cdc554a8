"""Client addresses: X-Forwarded-For is believed only from trusted proxies."""

from __future__ import annotations

import ipaddress

from aiohttp.test_utils import make_mocked_request

from cargohold.identity import Identity, client_address

PROXIES = [ipaddress.ip_network("10.0.0.0/8")]


def _request(peer: str, forwarded: str | None = None):  # type: ignore[no-untyped-def]
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    req = make_mocked_request("GET", "/v2/", headers=headers)
    req._transport_peername = (peer, 1234)  # type: ignore[attr-defined]
    return req


def test_untrusted_peer_cannot_spoof() -> None:
    assert str(client_address(_request("192.0.2.7", "203.0.113.9"), PROXIES)) == "192.0.2.7"


def test_trusted_proxy_hop_is_skipped() -> None:
    assert str(client_address(_request("10.1.1.1", "203.0.113.9"), PROXIES)) == "203.0.113.9"


def test_chain_stops_at_first_untrusted_hop() -> None:
    # The client wrote 198.51.100.1 itself; the proxy appended the real peer 203.0.113.9.
    req = _request("10.1.1.1", "198.51.100.1, 203.0.113.9, 10.2.2.2")
    assert str(client_address(req, PROXIES)) == "203.0.113.9"


def test_garbage_header_falls_back_to_last_trusted_hop() -> None:
    assert str(client_address(_request("10.1.1.1", "not-an-ip"), PROXIES)) == "10.1.1.1"


def test_identity_key_prefers_user() -> None:
    addr = ipaddress.ip_address("192.0.2.1")
    assert Identity(addr).key == "ip:192.0.2.1"
    assert Identity(addr, user="alice").key == "user:alice"
