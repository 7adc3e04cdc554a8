"""The default token-realm allow-list: host normalisation, the registrable-domain rule, the
own-host-only table, and ports."""

from __future__ import annotations

import pytest

from cargohold.config import ConfigError, Settings, UpstreamConfig
from cargohold.upstream.realms import RealmPolicy, RefusedTarget, default_realm_hosts


def _policy(url: str, token_realms: list[str] | None = None) -> RealmPolicy:
    return RealmPolicy(UpstreamConfig(name="r.test", url=url, token_realms=token_realms))


def _refused(policy: RealmPolicy, realm: str) -> dict[str, object]:
    """Where the refused realm was (for the log); the client's detail names only the upstream and the setting."""
    with pytest.raises(RefusedTarget) as refused:
        policy.check(realm)
    assert refused.value.detail == {"upstream": "r.test", "setting": "token_realms"}
    return {"realm_host": refused.value.host, "realm_port": refused.value.port}


# One customer (or account) per host: a neighbour under the same parent is someone else.
OWN_HOST_ONLY = [
    "myorg.jfrog.io",
    "myreg.azurecr.io",
    "myreg.azurecr.cn",
    "myreg.azurecr.us",
    "123456789012.dkr.ecr.us-east-1.amazonaws.com",
    "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn",
    "mytunnel.loca.lt",
]


@pytest.mark.parametrize("host", OWN_HOST_ONLY)
def test_shared_registry_domains_trust_their_own_host_only(host: str) -> None:
    assert default_realm_hosts(host) == []
    assert default_realm_hosts(host.upper() + ".") == []
    neighbour = "evil." + host.partition(".")[2]
    policy = _policy(f"https://{host}")
    policy.check(f"https://{host}/oauth2/token")
    policy.check(f"https://auth.{host}/token")
    assert _refused(policy, f"https://{neighbour}/token")["realm_host"] == neighbour
    assert _refused(policy, f"https://{neighbour}./token")["realm_host"] == neighbour


def test_the_parent_domain_is_trusted_only_when_it_is_the_registrable_domain() -> None:
    assert default_realm_hosts("registry.example.com") == ["example.com", "*.example.com"]
    assert default_realm_hosts("registry.example.co.uk") == ["example.co.uk", "*.example.co.uk"]
    assert default_realm_hosts("registry.team.example.com") == []  # team.example.com is not example.com
    assert default_realm_hosts("myreg.herokuapp.com") == []  # the parent is a public suffix
    assert default_realm_hosts("registry.internal") == [] and default_realm_hosts("localhost") == []
    deep = _policy("https://registry.team.example.com")
    deep.check("https://auth.registry.team.example.com/token")
    for realm in ("https://auth.team.example.com/token", "https://auth.example.com/token"):
        _refused(deep, realm)


def test_hosts_are_compared_lower_case_without_a_trailing_dot() -> None:
    assert default_realm_hosts("Registry.Example.COM.") == ["example.com", "*.example.com"]
    hub = _policy("https://registry-1.docker.io")
    for realm in ("https://auth.docker.io./token", "https://AUTH.Docker.IO/token", "https://registry-1.docker.io./t"):
        hub.check(realm)
    _refused(hub, "https://auth.docker.io.evil.example./token")
    dotted = _policy("https://Registry-1.Docker.IO.")  # the upstream's own name, written with a dot
    dotted.check("https://auth.docker.io/token")
    dotted.check("https://registry-1.docker.io:5001/token")  # its very host
    listed = _policy("https://registry.example.com", ["auth.example.net"])
    listed.check("https://AUTH.example.net./token")


def test_international_names_are_compared_as_idna_a_labels() -> None:
    assert default_realm_hosts("registry.bücher.example") == ["xn--bcher-kva.example", "*.xn--bcher-kva.example"]
    policy = _policy("https://registry.BÜCHER.example")
    policy.check("https://auth.bücher.example/token")
    policy.check("https://auth.xn--bcher-kva.example/token")
    policy.check("https://registry.xn--bcher-kva.example:5001/token")  # its very host, in either spelling
    assert _refused(policy, "https://auth.bucher.example/token")["realm_host"] == "auth.bucher.example"
    # As aiohttp connects (IDNA 2008: ß stays ß), not as Python's IDNA 2003 codec maps it (to ss).
    listed = _policy("https://registry.example.com", ["auth.ss.example"])
    listed.check("https://auth.ss.example/token")
    assert _refused(listed, "https://auth.ß.example/token")["realm_host"] == "auth.xn--zca.example"
    # A look-alike (Cyrillic і and о) is another host.
    assert _refused(_policy("https://registry-1.docker.io"), "https://auth.docker.\u0456\u043e/token")[
        "realm_host"
    ] == ("auth.docker.xn--n1a1c")


def test_realm_ports_default_upstreams_own_or_listed() -> None:
    hub = _policy("https://registry-1.docker.io")
    hub.check("https://auth.docker.io:443/token")
    detail = _refused(hub, "https://auth.docker.io:8443/token")
    assert detail["realm_host"] == "auth.docker.io" and detail["realm_port"] == 8443
    _refused(hub, "https://auth.docker.io:80/token")  # 80 is http's port, not https's
    hub.check("https://registry-1.docker.io:8443/token")  # its very host: any port
    own_port = _policy("https://registry.example.com:8443")
    own_port.check("https://auth.example.com:8443/token")
    own_port.check("https://auth.example.com/token")
    own_port.check("https://auth.registry.example.com:8443/token")
    _refused(own_port, "https://auth.example.com:9000/token")
    _refused(own_port, "https://auth.registry.example.com:9000/token")  # a subdomain is another host
    plain = _policy("http://registry.example.com:5000")
    plain.check("http://auth.example.com/token")
    plain.check("https://auth.example.com/token")
    plain.check("http://registry.example.com:5001/token")
    _refused(plain, "http://auth.example.com:5001/token")
    # token_realms may name a port: that host on that port (only), besides the usual ports elsewhere.
    listed = _policy(
        "https://registry.example.com", ["auth.example.net:5001", "*.tokens.example.net", "id.example.org"]
    )
    listed.check("https://auth.example.net:5001/token")
    _refused(listed, "https://auth.example.net/token")
    _refused(listed, "https://auth.example.net:5002/token")
    listed.check("https://a.tokens.example.net/token")
    _refused(listed, "https://a.tokens.example.net:5001/token")
    listed.check("https://id.example.org:443/token")
    _refused(listed, "https://auth.example.com/token")  # token_realms replaces the default


def test_token_realms_config_takes_host_port() -> None:
    upstream = {"name": "r.test", "url": "https://registry.example.com"}
    config = Settings.model_validate(
        {"upstreams": [{**upstream, "token_realms": ["Auth.Example.net:5001", "*.x.test:1"]}]}
    )
    assert config.upstreams[0].token_realms == ["auth.example.net:5001", "*.x.test:1"]
    for bad in ("auth.example.net:abc", "auth.example.net:", "https://auth.example.net", "auth.example.net:123456"):
        with pytest.raises((ConfigError, ValueError)):
            Settings.model_validate({"upstreams": [{**upstream, "token_realms": [bad]}]})
