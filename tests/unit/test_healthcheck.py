"""The container's HEALTHCHECK (`python -m cargohold.healthcheck`) against a server on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cargohold import healthcheck


async def test_a_proxy_set_for_upstreams_does_not_carry_the_health_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/upstreams.md has operators set HTTP(S)_PROXY for upstream traffic; the check went through it
    to a loopback address the proxy cannot reach, and the container was reported unhealthy."""

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        config = tmp_path / "cargohold.yaml"
        config.write_text(f"listen: 127.0.0.1:{server.port}\ndata_dir: {tmp_path / 'data'}\n")
        monkeypatch.setenv("CARGOHOLD_CONFIG", str(config))
        for variable in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(variable, "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert await asyncio.to_thread(healthcheck.main) == 0
        await server.close()
        assert await asyncio.to_thread(healthcheck.main) == 1  # and a server that is gone is unhealthy
    finally:
        await server.close()
