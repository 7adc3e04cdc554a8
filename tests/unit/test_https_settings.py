"""TLS and proxy settings, the plain-HTTP listener, and the public URL behind a proxy (in-process servers)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from cargohold.config import AcmeConfig, ConfigError, Settings, load_settings
from cargohold.external import public_base_url
from cargohold.healthcheck import health_url
from cargohold.tls.acme import AcmeManager
from cargohold.tls.context import server_context
from cargohold.tls.plain import plain_http_app
from rig.certs import TestCA

ACME = "tls:\n  acme:\n    domains: [registry.example.com]\n    email: ops@example.com\n"


def _load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Settings:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    return load_settings(config, environ=environ or {})


def test_acme_settings_and_environment(tmp_path: Path) -> None:
    settings = _load(
        tmp_path, ACME + "http_listen: 0.0.0.0:8080\n", {"CARGOHOLD_EXTERNAL_URL": "https://registry.example.com/"}
    )
    acme = settings.tls.acme
    assert acme is not None and acme.domains == ["registry.example.com"]
    assert acme.directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert settings.tls.enabled and settings.http_listen == "0.0.0.0:8080"
    assert settings.external_url == "https://registry.example.com/"
    from_env = load_settings(
        None,
        environ={"CARGOHOLD_TLS__ACME__DOMAINS": "[a.example, b.example]", "CARGOHOLD_HTTP_LISTEN": "0.0.0.0:80"},
    )
    assert from_env.tls.acme is not None and from_env.tls.acme.domains == ["a.example", "b.example"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (ACME, "tls.acme needs http_listen"),
        ("http_listen: 0.0.0.0:80\n", "http_listen redirects to HTTPS"),
        ("tls:\n  cert: /c.pem\n", "tls: cert and key go together"),
        (
            "tls:\n  cert: /c.pem\n  key: /k.pem\n  acme: {domains: [a.example]}\nhttp_listen: :80\n",
            "either cert/key files or acme",
        ),
        ("tls:\n  acme: {domains: [not a name]}\nhttp_listen: :80\n", "tls.acme.domains: invalid domain"),
        ("tls:\n  acme: {domains: []}\nhttp_listen: :80\n", "tls.acme.domains"),
        ("external_url: registry.example.com\n", "invalid external_url"),
        ("external_url: https://example.com/mirror\n", "invalid external_url"),
    ],
)
def test_bad_tls_settings_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


def test_server_context_refuses_old_protocols(tmp_path: Path) -> None:
    ca = TestCA.create()
    ca.issue(tmp_path / "c.pem", tmp_path / "k.pem", ["localhost"])
    ctx = server_context(tmp_path / "c.pem", tmp_path / "k.pem")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert all(c["protocol"] in ("TLSv1.2", "TLSv1.3") and c["aead"] for c in ctx.get_ciphers())


async def _plain(aiohttp_client: Any, https_port: int = 8443, **settings: Any) -> TestClient:
    app = plain_http_app(Settings(**settings), {"tok": "tok.thumbprint"}, https_port)
    return await aiohttp_client(app)


async def test_plain_listener_answers_challenges_and_health_and_redirects(aiohttp_client: Any) -> None:
    client = await _plain(aiohttp_client)
    answer = await client.get("/.well-known/acme-challenge/tok")
    assert answer.status == 200 and await answer.text() == "tok.thumbprint"
    missing = await client.get("/.well-known/acme-challenge/other")
    assert missing.status == 404 and (await missing.json())["errors"][0]["code"] == "UNSUPPORTED"
    assert (await client.get("/health")).status == 200
    moved = await client.get(
        "/v2/library/alpine/manifests/3?x=1", headers={"Host": "mirror.example:80"}, allow_redirects=False
    )
    assert moved.status == 308
    assert moved.headers["Location"] == "https://mirror.example:8443/v2/library/alpine/manifests/3?x=1"


async def test_with_acme_a_redirect_names_only_its_domains(aiohttp_client: Any) -> None:
    """Without external_url the redirect named whatever Host the client sent (`Host: evil.example` ->
    `https://evil.example/...`); with ACME the names are known."""
    acme = {"acme": {"domains": ["mirror.example", "alias.example"]}}
    client = await _plain(aiohttp_client, 443, tls=acme, http_listen="127.0.0.1:8080")
    for host, expected in (("evil.example", "mirror.example"), ("ALIAS.example:80", "alias.example")):
        moved = await client.get("/v2/", headers={"Host": host}, allow_redirects=False)
        assert moved.status == 308 and moved.headers["Location"].lower() == f"https://{expected}/v2/"


async def test_redirect_drops_the_default_port_and_follows_external_url(aiohttp_client: Any) -> None:
    default = await _plain(aiohttp_client, 443)
    moved = await default.head("/v2/", headers={"Host": "mirror.example"}, allow_redirects=False)
    assert moved.headers["Location"] == "https://mirror.example/v2/"
    # In a container cargohold listens on 8443 while clients use 443: external_url says so.
    external = await _plain(aiohttp_client, 8443, external_url="https://registry.example.com")
    moved = await external.get("/v2/?n=1", headers={"Host": "registry.example.com"}, allow_redirects=False)
    assert moved.headers["Location"] == "https://registry.example.com/v2/?n=1"


async def _base_url(aiohttp_client: Any, headers: dict[str, str], **settings: Any) -> str:
    config = Settings(**settings)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=public_base_url(request, config))

    app = web.Application()
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    return await (await client.get("/", headers=headers)).text()


async def test_public_base_url_behind_a_trusted_proxy(aiohttp_client: Any) -> None:
    forwarded = {"Host": "cargohold:5000", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "registry.example.com"}
    assert await _base_url(aiohttp_client, forwarded) == "http://cargohold:5000"  # nobody trusted: headers ignored
    trusted = {"rate_limit": {"trusted_proxies": ["127.0.0.0/8"]}}
    assert await _base_url(aiohttp_client, forwarded, **trusted) == "https://registry.example.com"
    pinned = await _base_url(aiohttp_client, forwarded, external_url="https://mirror.example.org/", **trusted)
    assert pinned == "https://mirror.example.org"


def test_health_check_url_follows_the_listeners() -> None:
    plain = Settings(listen="0.0.0.0:5000")
    assert health_url(plain) == "http://127.0.0.1:5000/health"
    files = Settings(listen="[::]:8443", tls={"cert": "/c.pem", "key": "/k.pem"})
    assert health_url(files) == "https://[::1]:8443/health"
    acme = Settings(listen="0.0.0.0:8443", http_listen="0.0.0.0:8080", tls={"acme": {"domains": ["a.example"]}})
    assert health_url(acme) == "http://127.0.0.1:8080/health"


def test_a_stored_acme_pair_counts_only_when_it_loads_for_the_configured_names(tmp_path: Path) -> None:
    manager = AcmeManager(AcmeConfig(domains=["registry.example.com"]), tmp_path)
    assert not manager.has_certificate()
    ca = TestCA.create()
    ca.issue(manager.cert_path, manager.key_path, ["registry.example.com"])
    assert manager.has_certificate()
    ca.issue(tmp_path / "other.pem", manager.key_path, ["registry.example.com"])  # new key, old chain
    assert not manager.has_certificate()
    ca.issue(manager.cert_path, manager.key_path, ["old-name.example.com"])
    assert not manager.has_certificate()
