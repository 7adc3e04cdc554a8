"""Which proxy an upstream request leaves through, and the `proxy` setting's check."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cargohold.config import ConfigError, UpstreamConfig, load_settings
from cargohold.upstream.client import UpstreamClient
from cargohold.upstream.egress import Egress
from rig.certs import TestCA
from rig.proxy import ForwardProxy


def test_environment_proxies_no_proxy_and_the_configured_one() -> None:
    env = {"http": "http://proxy.test:3128", "https": "proxy.test:3129", "no": "127.0.0.1,.internal.test"}
    egress = Egress(None, env)
    assert egress.proxy_for("http://registry.test/v2/") == "http://proxy.test:3128"
    assert egress.proxy_for("https://registry.test/v2/") == "http://proxy.test:3129"  # scheme-less as curl takes it
    assert egress.proxy_for("http://127.0.0.1:5000/v2/") is None
    assert egress.proxy_for("https://cdn.internal.test/blob") is None
    assert Egress(None, {}).proxy_for("https://registry.test/") is None
    configured = Egress("http://user:pw@own.test:8080", env)  # wins over the environment, NO_PROXY included
    assert configured.proxy_for("http://127.0.0.1:5000/v2/") == "http://user:pw@own.test:8080"


def test_proxy_setting_is_checked_without_echoing_it(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "upstreams:\n  - {name: docker.io, url: 'https://x.test', proxy: 'socks5://u:secret@p.test:1080'}\n"
    )
    with pytest.raises(ConfigError, match=r"upstreams\.0\.proxy") as caught:
        load_settings(config, environ={})
    assert "secret" not in str(caught.value)
    config.write_text("upstreams:\n  - {name: docker.io, url: 'https://x.test', proxy: 'https://p.test:3128'}\n")
    assert load_settings(config, environ={}).upstreams[0].proxy == "https://p.test:3128"


async def test_an_https_upstream_is_tunnelled_with_connect(tmp_path: Path) -> None:
    """aiohttp opens a CONNECT tunnel to the proxy for https; TLS is still verified end to end."""
    ca = TestCA.create()
    ca.issue(tmp_path / "cert.pem", tmp_path / "key.pem", ["registry.test"], ["127.0.0.1"])
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def manifest(request: web.Request) -> web.Response:
        return web.json_response({"schemaVersion": 2}, headers={"Docker-Content-Digest": "sha256:" + "0" * 64})

    app = web.Application()
    app.router.add_get("/v2/team/app/manifests/{ref}", manifest)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=served).start()
    port = runner.addresses[0][1]
    trusted = ssl.create_default_context(cafile=str(ca.write_root(tmp_path / "root.pem")))
    try:
        with ForwardProxy() as proxy:
            config = UpstreamConfig(name="registry.test", url=f"https://127.0.0.1:{port}", proxy=proxy.url)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted)) as session:
                resp = await UpstreamClient(config, session).open("GET", "team/app", "/v2/team/app/manifests/1.0")
                async with resp:
                    assert resp.status == 200 and await resp.json() == {"schemaVersion": 2}
            assert proxy.requests == [("CONNECT", f"127.0.0.1:{port}")]
    finally:
        await runner.cleanup()
