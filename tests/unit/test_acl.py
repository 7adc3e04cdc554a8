"""Access rules: users, groups, globs per upstream, anonymous by network."""

from __future__ import annotations

import ipaddress

import pytest

from cargohold.auth.acl import Acl
from cargohold.config import AuthConfig, ConfigError, load_settings
from cargohold.identity import Identity

ADDR = ipaddress.ip_address("192.0.2.10")


def _acl(**auth: object) -> Acl:
    return Acl.from_config(AuthConfig.model_validate({"htpasswd": "/dev/null", **auth}))


def _who(acl: Acl, user: str | None) -> Identity:
    return Identity(ADDR, user, acl.groups_of(user) if user else frozenset())


def test_without_rules_every_user_pulls_everything() -> None:
    acl = _acl()
    assert acl.allows(_who(acl, "alice"), "ghcr.io", "any/thing")
    assert not acl.anonymous_allowed(ADDR)


def test_rules_by_user_group_upstream_and_glob() -> None:
    acl = _acl(
        groups={"devs": ["bob", "carol"]},
        rules=[
            {"users": ["alice"], "repositories": ["library/*"]},
            {"groups": ["devs"], "upstream": "ghcr.io", "repositories": ["acme/*", "tools/cli"]},
            {"users": ["*"], "upstream": "quay.io"},
            {"repositories": ["public/*"]},
        ],
    )
    alice, bob, anon = _who(acl, "alice"), _who(acl, "bob"), _who(acl, None)
    assert acl.allows(alice, "docker.io", "library/alpine")
    assert not acl.allows(alice, "docker.io", "acme/tool")
    assert acl.allows(bob, "ghcr.io", "acme/tool") and acl.allows(bob, "ghcr.io", "tools/cli")
    assert not acl.allows(bob, "docker.io", "acme/tool") and not acl.allows(bob, "ghcr.io", "tools/other")
    assert not acl.allows(bob, "docker.io", "library/alpine")
    assert acl.allows(alice, "quay.io", "x/y") and acl.allows(bob, "quay.io", "x/y")
    assert not acl.allows(anon, "quay.io", "x/y")
    assert acl.allows(anon, "docker.io", "public/a") and acl.allows(alice, "ghcr.io", "public/a")
    assert not acl.allows(anon, "docker.io", "library/alpine")
    assert not acl.allows(alice, "docker.io", "library/alpine", action="push")
    assert acl.groups_of("carol") == frozenset({"devs"}) and acl.groups_of("alice") == frozenset()


def test_anonymous_for_all_or_by_network() -> None:
    assert _acl(anonymous=True).anonymous_allowed(ADDR)
    nets = _acl(anonymous=["10.0.0.0/8", "192.0.2.0/28", "fd00::/8"])
    assert nets.anonymous_allowed(ADDR)
    assert nets.anonymous_allowed(ipaddress.ip_address("fd00::1"))
    assert not nets.anonymous_allowed(ipaddress.ip_address("192.0.2.200"))
    assert not nets.anonymous_allowed(ipaddress.ip_address("203.0.113.1"))


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({"htpasswd": "/x", "rules": [{"groups": ["ops"]}]}, "groups not defined in auth.groups: ops"),
        ({"htpasswd": "/x", "rules": [{"actions": ["push"]}]}, "auth.rules.0.actions.0"),
        ({"htpasswd": "/x", "anonymous": ["not-a-net"]}, "auth.anonymous"),
        ({"htpasswd": "/x", "token_ttl": "soon"}, "auth.token_ttl"),
        ({"htpasswd": "/x", "rule": []}, "auth.rule: unknown key"),
        ({"anonymous": True}, "auth.htpasswd"),
    ],
)
def test_config_errors_name_the_key(auth: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(environ={}, overrides={"auth": auth})


def test_config_defaults() -> None:
    settings = load_settings(environ={}, overrides={"auth": {"htpasswd": "/etc/cargohold/htpasswd"}})
    assert settings.auth is not None
    assert settings.auth.anonymous is False and settings.auth.rules is None and settings.auth.token_ttl == 300
    assert load_settings(environ={}).auth is None
