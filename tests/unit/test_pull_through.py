"""Pull-through rules against an in-process upstream that demands Bearer tokens like Docker Hub."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cargohold.app import build_app
from cargohold.config import Settings

BLOB = b"layer-bytes" * 100_000
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": BLOB_DIGEST, "size": len(BLOB)},
        "layers": [],
    }
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


def fake_hub(counts: Counter) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        counts["token"] += 1
        return web.json_response({"token": "t0k", "expires_in": 300})

    def authorized(request: web.Request) -> None:
        if request.headers.get("Authorization") != "Bearer t0k":
            realm = f"http://{request.host}/token"
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="hub"'})

    async def manifest(request: web.Request) -> web.Response:
        authorized(request)
        counts[f"{request.method} manifest"] += 1
        if request.match_info["ref"] not in ("latest", MANIFEST_DIGEST):
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        return web.Response(
            body=MANIFEST,
            headers={
                "Content-Type": "application/vnd.oci.image.manifest.v1+json",
                "Docker-Content-Digest": MANIFEST_DIGEST,
            },
        )

    async def blob(request: web.Request) -> web.StreamResponse:
        authorized(request)
        counts[f"{request.method} blob"] += 1
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(BLOB))})
        response = web.StreamResponse(headers={"Content-Length": str(len(BLOB))})
        await response.prepare(request)
        for i in range(0, len(BLOB), 65536):
            await response.write(BLOB[i : i + 65536])
            await asyncio.sleep(0.001)
        return response

    app = web.Application()
    app.router.add_get("/token", token)
    app.router.add_get("/v2/library/app/manifests/{ref}", manifest)
    app.router.add_get("/v2/library/app/blobs/{digest}", blob)
    return app


@pytest.fixture
async def mirror(tmp_path: Path):
    counts: Counter = Counter()
    hub = TestServer(fake_hub(counts), host="127.0.0.1")
    await hub.start_server()
    settings = Settings.model_validate(
        {
            "data_dir": str(tmp_path),
            "upstreams": [{"name": "docker.io", "url": str(hub.make_url("")), "tag_ttl": "10m"}],
        }
    )
    client = TestClient(TestServer(build_app(settings), host="127.0.0.1"))
    await client.start_server()
    yield client, counts, tmp_path
    await client.close()
    await hub.close()


async def test_manifest_by_tag_is_cached_and_library_prefix_added(mirror) -> None:
    client, counts, _ = mirror
    for _ in range(3):
        resp = await client.get("/v2/app/manifests/latest")
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
        assert resp.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
        assert await resp.read() == MANIFEST
    assert counts["GET manifest"] == 1
    assert counts["token"] == 1


async def test_twenty_clients_cause_one_blob_fetch_and_blob_is_verified(mirror) -> None:
    client, counts, data_dir = mirror

    async def pull() -> bytes:
        resp = await client.get(f"/v2/library/app/blobs/{BLOB_DIGEST}")
        assert resp.status == 200
        return await resp.read()

    bodies = await asyncio.gather(*(pull() for _ in range(20)))
    assert all(body == BLOB for body in bodies)
    assert counts["GET blob"] == 1
    cached = data_dir / "blobs" / "sha256" / BLOB_DIGEST[7:9] / BLOB_DIGEST[7:]
    assert cached.read_bytes() == BLOB
    resp = await client.get(f"/v2/app/blobs/{BLOB_DIGEST}", headers={"Range": "bytes=10-19"})
    assert resp.status == 206 and await resp.read() == BLOB[10:20]
    assert counts["GET blob"] == 1


async def test_errors_are_oci_json(mirror) -> None:
    client, _, _ = mirror
    cases = [
        ("/v2/app/manifests/nope", 404, "MANIFEST_UNKNOWN"),
        ("/v2/app/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
        ("/v2/UPPER/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/quay.io/a/manifests/latest", 404, "NAME_UNKNOWN"),
    ]
    for path, status, code in cases:
        resp = await client.get(path)
        assert resp.status == status, path
        assert (await resp.json())["errors"][0]["code"] == code
    resp = await client.put("/v2/app/manifests/latest", data=b"{}")
    assert resp.status == 405 and (await resp.json())["errors"][0]["code"] == "UNSUPPORTED"


async def test_head_of_uncached_blob_gives_size_without_caching(mirror) -> None:
    client, _, data_dir = mirror
    resp = await client.head(f"/v2/app/blobs/{BLOB_DIGEST}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(BLOB))
    assert resp.headers["Docker-Content-Digest"] == BLOB_DIGEST
    assert not (data_dir / "blobs" / "sha256" / BLOB_DIGEST[7:9] / BLOB_DIGEST[7:]).exists()


async def test_expired_tag_is_revalidated_with_head_and_served_stale_when_upstream_is_down(tmp_path: Path) -> None:
    counts: Counter = Counter()
    hub = TestServer(fake_hub(counts), host="127.0.0.1")
    await hub.start_server()
    settings = Settings.model_validate(
        {"data_dir": str(tmp_path), "upstreams": [{"name": "docker.io", "url": str(hub.make_url("")), "tag_ttl": 0}]}
    )
    client = TestClient(TestServer(build_app(settings), host="127.0.0.1"))
    await client.start_server()
    try:
        assert (await client.get("/v2/app/manifests/latest")).status == 200
        assert (await client.get("/v2/app/manifests/latest")).status == 200
        assert counts["GET manifest"] == 1 and counts["HEAD manifest"] == 1
        await hub.close()
        resp = await client.get("/v2/app/manifests/latest")
        assert resp.status == 200 and await resp.read() == MANIFEST
        missing = await client.get("/v2/app/manifests/never-seen")
        assert missing.status == 503
        assert (await missing.json())["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        await client.close()
