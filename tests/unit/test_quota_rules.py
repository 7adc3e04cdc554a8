"""Docker Hub's pull quota (`upstream/quota.py`) and content mirrors (`upstream/mirrors.py`) at the typed remote,
against in-process registries: which requests spend a pull, what is refused at the reserve and after a 429, and
content by digest from a mirror first, verified, with the upstream as fallback and its credentials kept to itself."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cargohold.cache.download import Downloads
from cargohold.cache.index import SqliteIndex
from cargohold.cache.store import FsBlobStore
from cargohold.config import UpstreamConfig
from cargohold.errors import UpstreamRateLimited
from cargohold.oci.digests import Digest
from cargohold.oci.mediatypes import FULL_ACCEPT, OCI_MANIFEST
from cargohold.tasks import Tasks
from cargohold.upstream.client import UpstreamClient
from cargohold.upstream.mirrors import ContentMirrors, mirror_config
from cargohold.upstream.quota import Quota, reserve_of
from cargohold.upstream.repository import Repository

MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"digest": "sha256:" + "a" * 64, "size": 2}, "layers": []}
).encode()
MANIFEST_DIGEST = Digest.of(MANIFEST)
BLOB = b"layer bytes " * 1000
BLOB_DIGEST = Digest.of(BLOB)


@dataclass
class Registry:
    """A registry holding one manifest (tag 1.0) and one blob, with Docker Hub's quota headers when `limit` is set.
    `wrong`: serve other bytes than the digest names. `seen`: (method, path, Authorization)."""

    limit: int | None = None
    spent: int = 0
    retry_after: str | None = None
    holds: bool = True
    wrong: bool = False
    challenge: bool = False  # ask for Basic credentials
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)

    def gets(self, kind: str) -> int:
        return sum(1 for method, path, _ in self.seen if method == "GET" and f"/{kind}/" in path)

    def _quota(self) -> dict[str, str]:
        if self.limit is None:
            return {}
        left = max(0, self.limit - self.spent)
        return {"ratelimit-limit": f"{self.limit};w=21600", "ratelimit-remaining": f"{left};w=21600"}

    async def manifest(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path, request.headers.get("Authorization")))
        if self.challenge and "Authorization" not in request.headers:
            return web.json_response({}, status=401, headers={"WWW-Authenticate": 'Basic realm="test"'})
        if self.limit is not None and request.method == "GET" and self.spent >= self.limit:
            extra = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.json_response(
                {"errors": [{"code": "TOOMANYREQUESTS"}]}, status=429, headers={**self._quota(), **extra}
            )
        if not self.holds:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        if request.method == "GET" and self.limit is not None:
            self.spent += 1
        body = MANIFEST.replace(b"2", b"3") if self.wrong else MANIFEST
        headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": str(MANIFEST_DIGEST), **self._quota()}
        return web.Response(body=b"" if request.method == "HEAD" else body, headers=headers)

    async def blob(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path, request.headers.get("Authorization")))
        if not self.holds:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if request.method == "GET" and request.headers.get("X-Throttled"):
            return web.json_response({"errors": [{"code": "TOOMANYREQUESTS"}]}, status=429)
        return web.Response(body=BLOB.upper() if self.wrong else BLOB)


async def _serve(registry: Registry) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", registry.manifest)
    app.router.add_route("*", "/v2/{name:.+}/blobs/{ref}", registry.blob)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@dataclass
class Rig:
    upstream: Registry
    mirror: Registry
    remote: Repository


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    upstream, mirror = Registry(limit=10), Registry()
    up_server, mirror_server = await _serve(upstream), await _serve(mirror)
    url = str(up_server.make_url("")).rstrip("/")
    config = UpstreamConfig(name="docker.io", url=url, username="alice", password="secret", failure_pause=30)
    async with aiohttp.ClientSession() as session:
        mirrored = UpstreamClient(mirror_config(config, str(mirror_server.make_url("")).rstrip("/")), session)
        client = UpstreamClient(config, session, mirrors=ContentMirrors([mirrored]))
        yield Rig(upstream, mirror, Repository(client, "library/app"))
    await up_server.close()
    await mirror_server.close()


@pytest.fixture
async def plain() -> AsyncIterator[Rig]:
    """The same upstream without content mirrors."""
    upstream = Registry(limit=10)
    server = await _serve(upstream)
    config = UpstreamConfig(name="docker.io", url=str(server.make_url("")).rstrip("/"), failure_pause=30)
    async with aiohttp.ClientSession() as session:
        yield Rig(upstream, Registry(), Repository(UpstreamClient(config, session), "library/app"))
    await server.close()


def test_reserve_is_a_share_of_the_limit_rounded_up_or_a_count() -> None:
    assert reserve_of("10%", 100) == 10 and reserve_of("10%", 3) == 1 and reserve_of(5, 100) == 5
    assert UpstreamConfig(name="docker.io", url="https://x").quota_reserve == "10%"


async def test_manifest_gets_spend_pulls_heads_and_blobs_do_not(plain: Rig) -> None:
    quota = plain.remote.client.quota
    await plain.remote.get_manifest("1.0", FULL_ACCEPT)
    await plain.remote.head_manifest("1.0", FULL_ACCEPT)
    async with await plain.remote.open_blob(BLOB_DIGEST) as resp:
        await resp.read()
    figures = quota.figures()
    assert (quota.total, figures.spent, figures.remaining, figures.limit) == (1, 1, 9, 10)
    assert figures.resets_in is not None and 21590 < figures.resets_in <= 21600  # the pull leaves the window then


async def test_at_the_reserve_only_pulls_a_client_waits_for_go_upstream(
    plain: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    plain.upstream.spent = 8  # 2 left of 10; the default reserve is 10% = 1
    await plain.remote.deferrable().get_manifest("1.0", FULL_ACCEPT)  # 1 left now: at the reserve
    for _ in range(2):
        with pytest.raises(UpstreamRateLimited) as refused:
            await plain.remote.deferrable().get_manifest("1.0", FULL_ACCEPT)
        assert refused.value.detail["reason"] == "quota_reserve" and refused.value.status == 429
    assert plain.upstream.gets("manifests") == 1
    assert sum("at the reserve" in r.message for r in caplog.records) == 1  # logged once
    await plain.remote.get_manifest("1.0", FULL_ACCEPT)  # a waiting client still gets the last pull
    assert plain.upstream.gets("manifests") == 2


async def test_a_429_pauses_pulls_until_retry_after_but_not_heads_or_blobs(plain: Rig) -> None:
    plain.upstream.spent, plain.upstream.retry_after = 10, "120"
    with pytest.raises(UpstreamRateLimited) as first:
        await plain.remote.get_manifest("1.0", FULL_ACCEPT)
    assert first.value.headers == {"Retry-After": "120"}
    with pytest.raises(UpstreamRateLimited) as again:
        await plain.remote.get_manifest("2.0", FULL_ACCEPT)
    assert 119 <= int(again.value.headers["Retry-After"]) <= 120 and again.value.detail["reason"] == "quota_spent"
    assert plain.upstream.gets("manifests") == 1  # not asked again
    assert await plain.remote.head_manifest("1.0", FULL_ACCEPT) is not None  # free: still asked
    async with await plain.remote.open_blob(BLOB_DIGEST) as resp:
        assert await resp.read() == BLOB
    assert plain.remote.client.quota.figures().paused_for > 100


async def test_another_429_pauses_the_upstream_with_429_not_503(plain: Rig) -> None:
    client = plain.remote.client
    resp = await client.open("GET", "library/app", f"/v2/library/app/blobs/{BLOB_DIGEST}", {"X-Throttled": "1"})
    resp.release()
    with pytest.raises(UpstreamRateLimited) as paused:
        await plain.remote.head_manifest("1.0", FULL_ACCEPT)
    assert paused.value.status == 429 and "Retry-After" in paused.value.headers


async def test_manifest_by_digest_comes_from_the_mirror(rig: Rig) -> None:
    found, body = await rig.remote.get_manifest(str(MANIFEST_DIGEST), FULL_ACCEPT)
    assert body == MANIFEST and found.digest == MANIFEST_DIGEST
    assert rig.upstream.seen == [] and rig.mirror.gets("manifests") == 1
    assert rig.remote.client.quota.total == 0
    await rig.remote.get_manifest("1.0", FULL_ACCEPT)  # a tag is never asked at a mirror
    assert rig.mirror.gets("manifests") == 1 and rig.upstream.gets("manifests") == 1


async def test_the_upstreams_credentials_never_go_to_a_mirror(rig: Rig) -> None:
    rig.upstream.challenge = rig.mirror.challenge = True
    found, _ = await rig.remote.get_manifest(str(MANIFEST_DIGEST), FULL_ACCEPT)  # the mirror refuses: upstream
    async with await rig.remote.open_blob(BLOB_DIGEST) as resp:
        await resp.read()
    assert found.digest == MANIFEST_DIGEST
    assert rig.mirror.seen and all(auth is None for _, _, auth in rig.mirror.seen)
    assert rig.upstream.seen[-1][2] == "Basic " + base64.b64encode(b"alice:secret").decode()


@pytest.mark.parametrize("fault", ["missing", "wrong"])
async def test_a_manifest_the_mirror_lacks_or_gets_wrong_comes_from_the_upstream(rig: Rig, fault: str) -> None:
    rig.mirror.holds, rig.mirror.wrong = fault != "missing", fault == "wrong"
    found, body = await rig.remote.get_manifest(str(MANIFEST_DIGEST), FULL_ACCEPT)
    assert body == MANIFEST and found.digest == MANIFEST_DIGEST
    assert rig.mirror.gets("manifests") == 1 and rig.upstream.gets("manifests") == 1


async def test_blobs_come_from_the_mirror_and_from_the_upstream_when_it_lacks_them(rig: Rig) -> None:
    async with await rig.remote.open_blob(BLOB_DIGEST) as resp:
        assert await resp.read() == BLOB
    assert rig.mirror.gets("blobs") == 1 and rig.upstream.gets("blobs") == 0
    rig.mirror.holds = False
    other = Digest.of(b"another")
    async with await rig.remote.open_blob(other) as resp:
        assert await resp.read() == BLOB  # the upstream's answer (this fake serves one body for any digest)
    assert rig.mirror.gets("blobs") == 2 and rig.upstream.gets("blobs") == 1  # asked at the mirror first


async def test_a_blob_with_wrong_bytes_from_the_mirror_is_not_cached_and_the_upstream_serves_it(
    rig: Rig, tmp_path: Path
) -> None:
    rig.mirror.wrong = True
    index, store = SqliteIndex(tmp_path / "index.sqlite"), FsBlobStore(tmp_path)
    tasks = Tasks()
    downloads = Downloads(store, index, tasks)
    try:
        first = await downloads.join(BLOB_DIGEST, lambda: rig.remote.open_blob(BLOB_DIGEST))
        await first.wait_finished()
        assert first.error is not None and await store.locate(BLOB_DIGEST) is None  # detected, not cached
        for _ in range(100):  # the failed download leaves the table of running ones when its task ends
            if downloads.active(BLOB_DIGEST) is None:
                break
            await asyncio.sleep(0.01)
        second = await downloads.join(BLOB_DIGEST, lambda: rig.remote.open_blob(BLOB_DIGEST))
        await second.wait_finished()
        assert second.error is None and second.verified
        path = store.local_path(BLOB_DIGEST)
        assert path is not None and path.read_bytes() == BLOB
        assert rig.mirror.gets("blobs") == 1 and rig.upstream.gets("blobs") == 1  # the mirror was not asked again
    finally:
        await tasks.close()
        await index.close()


def test_an_upstreams_figures_are_bounded_and_a_pause_ends_when_pulls_are_left_again() -> None:
    """A header of 5,000 digits made every request to the upstream fail with a traceback (int() refuses
    it); `w=` of a year, or a Retry-After of one, paused pulls for that long; and a pause outlived the
    upstream saying pulls were left again."""
    quota = Quota("docker.io", "anonymous", "10%", 30.0)
    quota.observe({"RateLimit-Remaining": "1" * 5000, "RateLimit-Limit": "100;w=" + "9" * 5000})
    assert quota.remaining is None and quota.window == 21600.0  # no figure: nothing taken
    quota.observe({"RateLimit-Remaining": "0;w=999999999999", "RateLimit-Limit": "100;w=999999999999"})
    assert quota.remaining == 0 and quota.window == 86400.0
    quota.refused(31536000.0)
    assert 86000 < quota.paused_for() <= 86400
    quota.observe({"RateLimit-Remaining": "0;w=21600"})  # still none left: still paused
    assert quota.paused_for() > 86000
    quota.observe({"RateLimit-Remaining": "99;w=21600"})
    assert quota.paused_for() == 0 and quota.remaining == 99
    quota.check(deferrable=False)  # pulls go again
