"""Upstream egress through an HTTP proxy: HTTP(S)_PROXY/NO_PROXY from the environment, or an
upstream's own `proxy`, which wins. skopeo pulls through cargohold from the hub."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rig.clients import skopeo_copy
from rig.hub import Hub
from rig.proxy import ForwardProxy
from rig.server import Cargohold

Factory = Callable[..., Cargohold]
DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens: a request sent there fails


def _pull(srv: Cargohold, hub: Hub, tmp_path: Path, name: str) -> None:
    im = hub.images["oci"]
    out = skopeo_copy(f"{srv.netloc}/{im.ref}", tmp_path / name)
    assert out.digest == im.digest and set(im.blob_digests) <= set(out.blobs)


def test_upstream_requests_leave_through_the_proxy_from_the_environment(
    hub: Hub, cargohold: Factory, tmp_path: Path
) -> None:
    with ForwardProxy() as proxy:
        srv = cargohold(env={"HTTP_PROXY": proxy.url})
        _pull(srv, hub, tmp_path, "env")
        seen = proxy.requests
        # Every request the hub saw (registry and token service) came through the proxy.
        assert len(seen) == hub.count(service=None) > 0
        assert {url.split("/")[2] for _, url in seen} == {hub.netloc, f"127.0.0.1:{hub.token_port}"}
        assert ("GET", f"{hub.url}/v2/{hub.images['oci'].repo}/blobs/{hub.images['oci'].layers[0].digest}") in seen


def test_no_proxy_bypasses_it_and_an_upstreams_proxy_wins(hub: Hub, cargohold: Factory, tmp_path: Path) -> None:
    with ForwardProxy() as proxy:
        bypass = cargohold(env={"HTTP_PROXY": proxy.url, "NO_PROXY": "127.0.0.1"})
        _pull(bypass, hub, tmp_path, "bypass")
        assert proxy.requests == [] and hub.count(service=None) > 0
        bypass.stop()
        hub.reset_counts()
        own = cargohold(upstream={"proxy": proxy.url}, env={"HTTP_PROXY": DEAD_PROXY})
        _pull(own, hub, tmp_path, "own")
        assert len(proxy.requests) == hub.count(service=None) > 0
