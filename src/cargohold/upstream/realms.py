"""Which token realms an upstream may send us (and its credentials) to.

The realm comes from the upstream's `WWW-Authenticate` challenge, so without a check any
upstream (or anyone who can answer for it) could make cargohold send that upstream's
credentials to an arbitrary host, internal ones included. Allowed are the upstream's own host
and its subdomains, plus `token_realms` when configured, else a default that never reaches a
neighbour on a shared domain (`*.herokuapp.com`, `*.github.io`, `*.azurecr.io`): the realm of a
well-known registry from a built-in table, else the upstream's parent domain only when that is
not a public suffix (Public Suffix List, bundled with the package, read offline). A realm must
use https when the upstream does.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from publicsuffixlist import PublicSuffixList

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
    ("*.azurecr.io", ()),  # one customer per subdomain, and not in the Public Suffix List
    ("registry.k8s.io", ("*.pkg.dev",)),  # redirects pulls to Artifact Registry's regional hosts
)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def default_realm_hosts(host: str) -> list[str]:
    """Realm hosts trusted besides the upstream's own when `token_realms` is not set."""
    for pattern, realms in WELL_KNOWN_REALMS:
        if _matches(host, pattern):
            return list(realms)
    labels = host.split(".")
    if _is_ip(host) or len(labels) < 3:
        return []
    parent = ".".join(labels[1:])
    # Loaded only here (about 50 ms), for upstreams that are neither an address nor well known.
    if PublicSuffixList().is_public(parent):
        return []
    return [parent, "*." + parent]


def _matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


class RealmPolicy:
    """Answers whether a token realm URL is one this upstream may use."""

    def __init__(self, config: UpstreamConfig) -> None:
        base = urlsplit(config.url)
        self._name = config.name
        self._https = base.scheme == "https"
        host = (base.hostname or "").lower()
        own = [host] if _is_ip(host) else [host, "*." + host]
        extra = config.token_realms if config.token_realms is not None else default_realm_hosts(host)
        self.allowed = tuple(own + list(extra))

    def check(self, realm: str) -> None:
        """Raise UpstreamInvalid unless `realm` is http(s) on an allowed host (https if the upstream is)."""
        parts = urlsplit(realm)
        host = (parts.hostname or "").lower()
        schemes = ("https",) if self._https else ("http", "https")
        if parts.scheme not in schemes or not host:
            raise UpstreamInvalid(f"upstream {self._name} named an unusable token realm", {"realm": realm[:200]})
        if not any(_matches(host, pattern) for pattern in self.allowed):
            raise UpstreamInvalid(
                f"upstream {self._name} named a token realm on a host it may not use (see token_realms)",
                {"upstream": self._name, "realm_host": host[:255]},
            )
