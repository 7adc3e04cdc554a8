"""Many upstreams: which upstream a request means, which repositories it may name, where tokens may come from."""

from __future__ import annotations

import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cargohold.app import build_app
from cargohold.config import ConfigError, Settings, UpstreamConfig, load_settings
from cargohold.errors import NameUnknown, UpstreamInvalid
from cargohold.upstream.client import UpstreamClient
from cargohold.upstream.realms import RealmPolicy
from cargohold.upstream.routing import Router, compile_globs

UPSTREAMS = [
    {"name": "docker.io", "url": "https://registry-1.docker.io", "hosts": ["hub.mirror.test"]},
    {
        "name": "ghcr.io",
        "url": "https://ghcr.io",
        "hosts": ["ghcr.mirror.test"],
        "repositories": ["acme/*", "tools/**"],
    },
    {"name": "registry.k8s.io", "url": "https://registry.k8s.io", "hosts": ["k8s.mirror.test:8443"]},
]


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    async with aiohttp.ClientSession() as session:
        clients = {u["name"]: UpstreamClient(UpstreamConfig.model_validate(u), session) for u in UPSTREAMS}
        yield Router(clients, "docker.io")


def _where(router: Router, name: str, ns: str | None = None, host: str | None = None) -> tuple[str, str, str | None]:
    target = router.resolve(name, ns, host)
    return target.upstream.name, target.repository, target.namespace


async def test_path_prefix_ns_host_and_default(router: Router) -> None:
    mirror = "mirror.test:5000"
    assert _where(router, "nginx", host=mirror) == ("docker.io", "library/nginx", None)
    assert _where(router, "ghcr.io/acme/app", host=mirror) == ("ghcr.io", "acme/app", None)
    assert _where(router, "acme/app", ns="ghcr.io", host=mirror) == ("ghcr.io", "acme/app", "ghcr.io")
    assert _where(router, "nginx", ns="docker.io") == ("docker.io", "library/nginx", "docker.io")
    # a mapped host name: the whole path is the repository, whatever its first component looks like
    assert _where(router, "acme/app", host="GHCR.mirror.test:5000") == ("ghcr.io", "acme/app", None)
    assert _where(router, "pause", host="k8s.mirror.test:8443") == ("registry.k8s.io", "pause", None)
    assert _where(router, "nginx", host="hub.mirror.test") == ("docker.io", "library/nginx", None)
    # a host entry with a port matches that port only
    assert _where(router, "pause", host="k8s.mirror.test:9999") == ("docker.io", "library/pause", None)
    # ns wins over the Host header
    assert _where(router, "acme/app", ns="ghcr.io", host="hub.mirror.test") == ("ghcr.io", "acme/app", "ghcr.io")


async def test_resolved_targets_are_remembered_by_route_not_by_any_host_a_client_sends(router: Router) -> None:
    """Each resolved target was remembered under the request's Host as sent: 9,000 requests with distinct
    8 KB Host headers took the server from 76 to 149 MB."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            assert _where(router, "nginx", host=f"{i:04}" + "h" * 4000) == ("docker.io", "library/nginx", None)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 256 << 10, grown  # was about 4 MB
    assert _where(router, "acme/app", host="ghcr.mirror.test") == ("ghcr.io", "acme/app", None)  # routes still count


async def test_unconfigured_registries_and_repositories_outside_the_globs_are_name_unknown(router: Router) -> None:
    for name, ns, host in [
        ("quay.io/org/app", None, None),
        ("org/app", "quay.io", None),
        ("localhost:5000/app", None, None),
        ("ghcr.io/other/app", None, None),  # not in acme/* or tools/**
        ("acme/deep/app", None, "ghcr.mirror.test"),  # * stays within one component
        ("acme", "ghcr.io", None),
    ]:
        with pytest.raises(NameUnknown):
            router.resolve(name, ns, host)
    assert _where(router, "ghcr.io/tools/a/b/c") == ("ghcr.io", "tools/a/b/c", None)


def test_globs() -> None:
    pattern = compile_globs(["library/*", "team/**", "app?"])
    assert pattern.fullmatch("library/nginx") and not pattern.fullmatch("library/a/b")
    assert pattern.fullmatch("team/a/b/c") and pattern.fullmatch("app1") and not pattern.fullmatch("app12")
    assert not pattern.fullmatch("library.x/nginx")  # a dot in a glob is a dot
    assert not compile_globs([]).fullmatch("anything")


def _policy(url: str, token_realms: list[str] | None = None) -> RealmPolicy:
    return RealmPolicy(UpstreamConfig(name="r.test", url=url, token_realms=token_realms))


def test_token_realms_default_to_the_upstreams_own_domain() -> None:
    hub = _policy("https://registry-1.docker.io")
    hub.check("https://auth.docker.io/token")
    hub.check("https://registry-1.docker.io/token")
    for bad in (
        "https://evil.example/token",
        "https://docker.io.evil.example/t",
        "http://auth.docker.io/token",
        "ftp://auth.docker.io/",
        "/token",
        "https://169.254.169.254/latest",
        "https://hub.docker.io/token",
    ):
        with pytest.raises(UpstreamInvalid):
            hub.check(bad)
    ghcr = _policy("https://ghcr.io")  # two labels: no parent domain (never all of .io)
    ghcr.check("https://ghcr.io/token")
    with pytest.raises(UpstreamInvalid):
        ghcr.check("https://other.io/token")
    loopback = _policy("http://127.0.0.1:5000")
    loopback.check("http://127.0.0.1:6000/token")
    with pytest.raises(UpstreamInvalid):
        loopback.check("http://127.0.0.2:6000/token")
    k8s = _policy("https://registry.k8s.io")  # built in: its own host and Artifact Registry's, where it redirects
    k8s.check("https://us-west2-docker.pkg.dev/v2/token")
    with pytest.raises(UpstreamInvalid):
        k8s.check("https://other.k8s.io/token")
    quay = _policy("https://quay.io", ["auth.quay.example"])  # configured: replaces the default
    quay.check("https://auth.quay.example/token")
    quay.check("https://quay.io/v2/auth")


def test_default_realms_never_reach_a_neighbour_on_a_shared_domain() -> None:
    """On hosting domains anyone can have a subdomain: only the upstream's own host is trusted."""
    for upstream, neighbour in [
        ("https://myreg.herokuapp.com", "https://evil.herokuapp.com/token"),  # public suffix (private section)
        ("https://me.github.io", "https://evil.github.io/token"),
        ("https://myreg.azurecr.io", "https://evil.azurecr.io/oauth2/token"),  # not in the PSL: built in
        ("https://eu.gcr.io", "https://evil.gcr.io/v2/token"),
        ("https://europe-docker.pkg.dev", "https://evil.pkg.dev/v2/token"),
        ("https://example.co.uk", "https://other.co.uk/token"),  # parent is a public suffix
    ]:
        policy = _policy(upstream)
        policy.check(upstream + "/token")
        with pytest.raises(UpstreamInvalid):
            policy.check(neighbour)
    widened = _policy("https://myreg.herokuapp.com", ["auth.herokuapp.com"])  # token_realms widens it
    widened.check("https://auth.herokuapp.com/token")
    # A parent that is a registrable domain is one owner's: its realm host is trusted.
    for upstream, realm in [
        ("https://registry.example.com", "https://auth.example.com/token"),
        ("https://registry.example.co.uk", "https://auth.example.co.uk/token"),
        ("https://registry.gitlab.com", "https://gitlab.com/jwt/auth"),
    ]:
        _policy(upstream).check(realm)


def test_config_checks_hosts_globs_and_default(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "upstreams:\n"
        "  - {name: docker.io, url: 'https://registry-1.docker.io', hosts: [a.test]}\n"
        "  - {name: ghcr.io, url: 'https://ghcr.io', hosts: [A.test]}\n"
    )
    with pytest.raises(ConfigError, match=r"repeated: a\.test"):
        load_settings(config, environ={})
    config.write_text("upstreams:\n  - {name: docker.io, url: 'https://x.test', repositories: ['Lib/*']}\n")
    with pytest.raises(ConfigError, match=r"upstreams\.0\.repositories"):
        load_settings(config, environ={})
    config.write_text("upstreams:\n  - {name: docker.io, url: 'https://x.test', hosts: ['http://a.test']}\n")
    with pytest.raises(ConfigError, match=r"upstreams\.0\.hosts"):
        load_settings(config, environ={})
    config.write_text("default_upstream: quay.io\nupstreams:\n  - {name: ghcr.io, url: 'https://ghcr.io'}\n")
    with pytest.raises(ConfigError, match=r"default_upstream 'quay\.io'"):
        load_settings(config, environ={})
    config.write_text(
        "default_upstream: quay.io\n"
        "upstreams:\n  - {name: ghcr.io, url: 'https://ghcr.io'}\n  - {name: quay.io, url: 'https://quay.io'}\n"
    )
    assert load_settings(config, environ={}).default.name == "quay.io"


async def test_a_realm_on_a_foreign_host_gets_no_request_and_no_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream naming a token realm elsewhere (here 127.0.0.2) gets 502 and the realm hears nothing."""
    seen: Counter[str] = Counter()

    async def token(request: web.Request) -> web.Response:
        seen["token"] += 1
        return web.json_response({"token": "stolen"})

    realm = TestServer(_app("/token", token), host="127.0.0.2")
    await realm.start_server()

    async def manifest(request: web.Request) -> web.Response:
        seen["manifest"] += 1
        realm_url = realm.make_url("/token")
        return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm_url}",service="x"'})

    upstream = TestServer(_app("/v2/team/app/manifests/{ref}", manifest), host="127.0.0.1")
    await upstream.start_server()
    settings = Settings.model_validate(
        {
            "data_dir": str(tmp_path),
            "upstreams": [
                {"name": "docker.io", "url": str(upstream.make_url("")), "username": "u", "password": "secret"}
            ],
        }
    )
    client = TestClient(TestServer(build_app(settings), host="127.0.0.1"))
    await client.start_server()
    try:
        resp = await client.get("/v2/team/app/manifests/latest")
        assert resp.status == 502
        error = (await resp.json())["errors"][0]
        # Where it was goes to the log; the client learns only which setting would allow it.
        assert error["code"] == "UNAVAILABLE" and error["detail"] == {
            "upstream": "docker.io",
            "setting": "token_realms",
        }
        assert "127.0.0.2" not in await resp.text() and "token realm on a host it may not use" in caplog.text
        assert f"127.0.0.2:{realm.port}/token" in caplog.text
        assert seen == Counter({"manifest": 1})
    finally:
        await client.close()
        await upstream.close()
        await realm.close()


def _app(path: str, handler: web.RequestHandler) -> web.Application:
    app = web.Application()
    app.router.add_get(path, handler)
    return app
