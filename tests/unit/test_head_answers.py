"""HEADs of tags whose manifest no GET has fetched (containerd and update checkers only HEAD): within
`tag_ttl` they are answered from the last upstream HEAD, after it the tag is asked again (once for
concurrent HEADs) and served stale when upstream fails; an unbelievable size falls back to a GET."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cargohold.app import build_app
from cargohold.config import Settings
from cargohold.oci.mediatypes import FULL_ACCEPT

MT = "application/vnd.oci.image.manifest.v1+json"
CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "a" * 64, "size": 1}
BODY = json.dumps({"schemaVersion": 2, "mediaType": MT, "config": CONFIG, "layers": []}).encode()
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()
PATH = "/v2/library/alpine/manifests/latest"


class Upstream:
    """A registry of one manifest that counts requests; `down` answers 503, `head_size` overrides
    the Content-Length of HEAD answers."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.down = False
        self.head_size: str | None = None

    async def manifest(self, request: web.Request) -> web.Response:
        self.counts[request.method] += 1
        if self.down:
            return web.Response(status=503)
        headers = {"Content-Type": MT, "Docker-Content-Digest": DIGEST}
        if request.method == "HEAD":
            await asyncio.sleep(0.05)  # long enough for concurrent HEADs to meet
            return web.Response(headers={**headers, "Content-Length": self.head_size or str(len(BODY))})
        return web.Response(body=BODY, headers=headers)


async def _ping(request: web.Request) -> web.Response:
    return web.json_response({})


@contextlib.asynccontextmanager
async def mirror(tmp_path: Path, upstream: Upstream, tag_ttl: str) -> AsyncIterator[TestClient]:
    up = web.Application()
    up.router.add_get("/v2/", _ping)
    up.router.add_get("/v2/{name:.+}/manifests/{ref}", upstream.manifest)
    server = TestServer(up, host="127.0.0.1")
    await server.start_server()
    upstreams: list[dict[str, Any]] = [
        {"name": "docker.io", "url": str(server.make_url("")), "tag_ttl": tag_ttl, "failure_pause": "0s"}
    ]
    app = build_app(Settings.model_validate({"data_dir": str(tmp_path / "data"), "upstreams": upstreams}))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await server.close()


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


async def _head(client: TestClient) -> tuple[int, str | None, str | None]:
    res = await client.head(PATH, headers={"Accept": FULL_ACCEPT})
    return res.status, res.headers.get("Docker-Content-Digest"), res.headers.get("Content-Length")


async def test_heads_within_the_ttl_ask_upstream_once(tmp_path: Path, upstream: Upstream) -> None:
    async with mirror(tmp_path, upstream, "10m") as client:
        answers = await asyncio.gather(*(_head(client) for _ in range(5)))  # concurrent: one upstream HEAD
        answers += [await _head(client) for _ in range(3)]  # within tag_ttl: none
        assert set(answers) == {(200, DIGEST, str(len(BODY)))}
        assert upstream.counts == Counter({"HEAD": 1})


async def test_an_expired_head_answer_is_served_stale_when_upstream_fails(tmp_path: Path, upstream: Upstream) -> None:
    async with mirror(tmp_path, upstream, "0s") as client:
        assert await _head(client) == (200, DIGEST, str(len(BODY)))
        upstream.down = True
        assert await _head(client) == (200, DIGEST, str(len(BODY)))  # stale, not 503
        assert upstream.counts["GET"] == 0


@pytest.mark.parametrize("size", ["0", "1", str(64 << 20)])
async def test_an_unbelievable_head_size_falls_back_to_a_get(tmp_path: Path, upstream: Upstream, size: str) -> None:
    upstream.head_size = size
    async with mirror(tmp_path, upstream, "10m") as client:
        assert await _head(client) == (200, DIGEST, str(len(BODY)))
        assert upstream.counts["GET"] == 1
