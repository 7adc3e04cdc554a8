"""Which token realms an upstream may send us (and its credentials) to.

The realm comes from the upstream's `WWW-Authenticate` challenge, so without a check any
upstream (or anyone who can answer for it) could make cargohold send that upstream's
credentials to an arbitrary host, internal ones included. Allowed are the upstream's own host
and its subdomains, plus `token_realms` when configured, else a default that never reaches a
neighbour on a shared domain (`*.herokuapp.com`, `*.azurecr.io`, one account per ECR host): the
realm of a well-known registry from a built-in table, else the upstream's parent domain only when
that is its registrable domain (Public Suffix List, bundled with the package, read offline).

Hosts are compared as aiohttp connects to them: lower case, IDNA A-labels (yarl's encoding), no
trailing dot. A realm must use https when the upstream does, and a port that is the default one
of its scheme or the upstream's own, unless it is on the upstream's very host (a token service
beside the registry, as docker_auth on :5001) or `token_realms` lists that `host:port`.
"""

from __future__ import annotations

import ipaddress
import re

from publicsuffixlist import PublicSuffixList
from yarl import URL

from cargohold.config import UpstreamConfig
from cargohold.errors import UpstreamInvalid

# Registries whose realms are known, first match wins: (upstream host pattern, realm hosts besides its own).
WELL_KNOWN_REALMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("registry-1.docker.io", ("auth.docker.io",)),
    ("docker.io", ("auth.docker.io",)),
    ("index.docker.io", ("auth.docker.io",)),
    ("ghcr.io", ()),
    ("quay.io", ()),
    ("gcr.io", ()),
    ("*.gcr.io", ()),
    ("*.pkg.dev", ()),
    ("registry.k8s.io", ("*.pkg.dev",)),  # redirects pulls to Artifact Registry's regional hosts
    # One customer per host, on domains the Public Suffix List does not split that way: own host only.
    ("*.azurecr.io", ()),
    ("*.azurecr.cn", ()),
    ("*.azurecr.us", ()),
    ("*.jfrog.io", ()),
    ("*.dkr.ecr.*.amazonaws.com", ()),
    ("*.dkr.ecr.*.amazonaws.com.cn", ()),
    ("*.loca.lt", ()),  # localtunnel: anyone's tunnel
)

DEFAULT_PORTS = {"http": 80, "https": 443}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normal_host(host: str) -> str:
    """`host` as compared here: yarl's encoding (lower case, IDNA A-labels, what aiohttp connects
    to), without a trailing dot (the same name to DNS). ValueError for a host yarl refuses."""
    encoded = URL.build(scheme="https", host=host).raw_host or ""
    return encoded[:-1] if encoded.endswith(".") else encoded


def _matches(host: str, pattern: str) -> bool:
    """`*.` in front stands for any subdomain (one or more labels), a later `*` label for one label."""
    labels = pattern.split(".")
    lead = r"(?:[^.]+\.)+" if labels[0] == "*" else ""
    body = r"\.".join("[^.]+" if label == "*" else re.escape(label) for label in labels[1 if lead else 0 :])
    return re.fullmatch(lead + body, host) is not None


def default_realm_hosts(host: str) -> list[str]:
    """Realm hosts trusted besides the upstream's own when `token_realms` is not set."""
    host = normal_host(host)
    for pattern, realms in WELL_KNOWN_REALMS:
        if _matches(host, pattern):
            return list(realms)
    parent = host.partition(".")[2]
    if _is_ip(host) or not parent:
        return []
    # Loaded only here (about 50 ms), for upstreams that are neither an address nor well known.
    # The registrable domain is one owner's; a deeper parent (dkr.ecr.REGION.amazonaws.com) or a
    # public suffix (herokuapp.com) may be many owners'.
    if PublicSuffixList().privatesuffix(host) != parent:
        return []
    return [parent, "*." + parent]


def _host_and_port(entry: str) -> tuple[str, int | None]:
    """A `token_realms` entry: `host`, `*.host`, or either with `:port`."""
    name, colon, port = entry.rpartition(":")
    return (normal_host(name), int(port)) if colon and port.isdigit() else (normal_host(entry), None)


class RealmPolicy:
    """Answers whether a token realm URL is one this upstream may use."""

    def __init__(self, config: UpstreamConfig) -> None:
        base = URL(config.url)
        self._name = config.name
        self._https = base.scheme == "https"
        self._host = normal_host(base.raw_host or "")
        self._port = base.port
        own = [self._host] if _is_ip(self._host) else [self._host, "*." + self._host]
        extra = config.token_realms if config.token_realms is not None else default_realm_hosts(self._host)
        # (host pattern, the one port a `token_realms` entry names, else None: the usual ports)
        self._allowed: tuple[tuple[str, int | None], ...] = tuple([(host, None) for host in own] + [_host_and_port(entry) for entry in extra])

    def check(self, realm: str) -> None:
        """Raise UpstreamInvalid unless `realm` is http(s) on an allowed host and port (https if the upstream is)."""
        try:
            url = URL(realm)
            host = normal_host(url.raw_host or "")
        except ValueError:
            url, host = URL(), ""
        schemes = ("https",) if self._https else ("http", "https")
        if not host or url.scheme not in schemes:
            raise UpstreamInvalid(f"upstream {self._name} named an unusable token realm", {"realm": realm[:200]})
        if host == self._host:
            return  # the upstream's very host, any port: a token service beside the registry
        usual = (DEFAULT_PORTS[url.scheme], self._port)
        ports = [port for pattern, port in self._allowed if _matches(host, pattern)]
        if not ports:
            raise UpstreamInvalid(
                f"upstream {self._name} named a token realm on a host it may not use (see token_realms)",
                {"upstream": self._name, "realm_host": host[:255]},
            )
        if not any(url.port in ((port,) if port is not None else usual) for port in ports):
            raise UpstreamInvalid(
                f"upstream {self._name} named a token realm on a port it may not use (see token_realms: host:port)",
                {"upstream": self._name, "realm_host": host[:255], "realm_port": url.port},
            )
