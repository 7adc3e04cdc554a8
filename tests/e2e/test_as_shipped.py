"""cargohold as a new user runs it: the shipped defaults (rate limiting on with the `team` preset,
default timeouts), nothing changed. Real clients pull twice each (cold, then warm, on their own
keep-alive connections), and a herd from one address is slowed, never refused. The `cargohold`
fixture fails any of these whose server log holds a traceback."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

import aiohttp

from rig import images as I
from rig.clients import Containerd, Dockerd, Podman, skopeo_copy, write_hosts_toml
from rig.hub import Hub
from rig.server import Cargohold

Factory = Callable[..., Cargohold]


def _twice(hub: Hub, pull: Callable[[], str], want: str) -> None:
    """Cold, then warm: both give the upstream's digest; the warm one asks upstream nothing."""
    assert pull() == want
    hub.reset_counts()
    assert pull() == want
    assert hub.count(service=None) == 0, [r.path for r in hub.requests]


def test_skopeo_pulls_twice_in_defaults(hub: Hub, cargohold: Factory, tmp_path: Path) -> None:
    srv = cargohold()
    im = hub.images["multi"]
    copies = iter(("cold", "warm"))
    _twice(hub, lambda: skopeo_copy(f"{srv.netloc}/{im.ref}", tmp_path / next(copies)).digest, im.digest)


def test_docker_pulls_twice_in_defaults(hub: Hub, cargohold: Factory, dockerd: Dockerd) -> None:
    srv = cargohold()
    im = hub.images["multi"]

    def pull() -> str:
        dockerd.remove_all_images()
        return dockerd.pull(f"{srv.netloc}/{im.ref}")

    _twice(hub, pull, im.digest)


def test_containerd_pulls_twice_in_defaults(
    hub: Hub, cargohold: Factory, containerd: Containerd, hosts_dir: Path
) -> None:
    srv = cargohold()
    write_hosts_toml(hosts_dir, srv.url)
    im = hub.images["multi"]
    # A fresh namespace per pull (the default): containerd fetches every blob again.
    _twice(hub, lambda: containerd.pull(f"docker.io/{im.ref}", hosts_dir=hosts_dir).digest, im.digest)


def test_podman_pulls_twice_in_defaults(hub: Hub, cargohold: Factory, podman: Podman) -> None:
    srv = cargohold()
    im = hub.images["multi"]
    _twice(hub, lambda: podman.pull(f"{srv.netloc}/{im.ref}"), im.digest)


async def _docker_like_pull(base: str, im: I.Image) -> list[int]:
    """One client as dockerd pulls: the manifest by tag, then every blob, three at a time."""
    connector = aiohttp.TCPConnector(limit=3)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.get(f"{base}/v2/{im.repo}/manifests/{im.tag}", headers={"Accept": I.ACCEPT_ALL}) as r:
            statuses = [r.status]
            assert await r.read() == im.manifest

        async def blob(b: I.Blob) -> int:
            async with session.get(f"{base}/v2/{im.repo}/blobs/{b.digest}") as r:
                body = await r.read()
                assert r.status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() == b.digest
                return r.status

        return statuses + list(await asyncio.gather(*(blob(b) for b in im.blobs)))


async def test_herd_from_one_address_is_slowed_never_refused(hub: Hub, cargohold: Factory) -> None:
    """20 docker-like clients x 3 blobs at once, one address, an uncached 21-layer image: 60 requests
    on team's 20 connection slots. They used to get 429 "too many connections" past 40."""
    srv = cargohold()
    im = hub.images["layers21"]
    results = await asyncio.gather(*(_docker_like_pull(srv.url, im) for _ in range(20)))
    refused = [s for statuses in results for s in statuses if s != 200]
    assert not refused, f"{len(refused)} requests refused: {sorted(set(refused))}"
    assert all(len(statuses) == 1 + len(im.blobs) for statuses in results)
