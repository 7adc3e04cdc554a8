"""Helpers for the upstream security tests: misbehaving upstreams as in-process aiohttp servers,
a cargohold app in front of them, a resolver that answers what a test says."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient, TestServer

from cargohold.app import build_app
from cargohold.config import Settings
from cargohold.oci.mediatypes import OCI_MANIFEST

CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "a" * 64, "size": 2}
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": CONFIG, "layers": []}).encode()


def manifest_response() -> web.Response:
    return web.Response(body=MANIFEST, content_type=OCI_MANIFEST)


@asynccontextmanager
async def served(routes: Mapping[str, web.RequestHandler], host: str = "127.0.0.1") -> AsyncIterator[TestServer]:
    """An aiohttp server on `host` answering GET and HEAD of each path pattern with its handler."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    server = TestServer(app, host=host)
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@asynccontextmanager
async def mirror(tmp_path: Path, *upstreams: Mapping[str, Any], **top: Any) -> AsyncIterator[TestClient[Any, Any]]:
    """cargohold in its shipped defaults in front of `upstreams` (the first one is the default)."""
    settings = Settings.model_validate({"data_dir": str(tmp_path), "upstreams": list(upstreams), **top})
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(settings), host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def error_of(resp: Any) -> dict[str, Any]:
    body = await resp.json()
    error: dict[str, Any] = body["errors"][0]
    return error


class ScriptedResolver(AbstractResolver):
    """Answers each host with the next of its scripted address lists (the last one repeats)."""

    def __init__(self, answers: Mapping[str, list[list[str]]]) -> None:
        self._answers = {host: list(lists) for host, lists in answers.items()}
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        lists = self._answers.get(host)
        if not lists:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        addresses = lists.pop(0) if len(lists) > 1 else lists[0]
        return [
            {"hostname": host, "host": a, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
            for a in addresses
        ]

    async def close(self) -> None:
        return None
