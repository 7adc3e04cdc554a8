"""Which token realms an upstream may send us (and its credentials) to, and where it may redirect us.

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

Redirects follow the same rules with more hosts: the realm hosts, the CDNs a well-known registry
sends downloads to (built-in table) and `redirect_hosts`. Which *addresses* those names may reach
is addresses.py's concern.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any

from publicsuffixlist import PublicSuffixList
from yarl import URL

from cargohold.config import UpstreamConfig
from cargohold.errors import UpstreamInvalid

log = logging.getLogger("cargohold.upstream")

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

# Registries whose blob downloads go to CDNs on other domains, first match wins: (upstream host
# pattern, CDN hosts). Docker Hub: its firewall allow-list (production.cloudflare.docker.com,
# production.cloudfront.docker.com, docker-images-prod.<account>.r2.cloudflarestorage.com) and the
# regional S3 buckets it redirects AWS clients to.
_DOCKER_HUB_CDNS = (
    "*.docker.com",
    "*.cloudfront.net",
    "*.r2.cloudflarestorage.com",
    "docker-images-prod.s3.amazonaws.com",
    "docker-images-prod.s3.*.amazonaws.com",
    "docker-images-prod.s3.dualstack.*.amazonaws.com",
)
WELL_KNOWN_REDIRECTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("registry-1.docker.io", _DOCKER_HUB_CDNS),
    ("docker.io", _DOCKER_HUB_CDNS),
    ("index.docker.io", _DOCKER_HUB_CDNS),
    ("ghcr.io", ("pkg-containers.githubusercontent.com",)),
    ("gcr.io", ("storage.googleapis.com", "*.pkg.dev")),
    ("*.gcr.io", ("storage.googleapis.com", "*.pkg.dev")),
    ("registry.k8s.io", ("*.pkg.dev", "*.s3.dualstack.*.amazonaws.com")),
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
    return encoded.removesuffix(".")


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


class RefusedTarget(UpstreamInvalid):
    """A realm or redirect the policy refuses; `host` and `port` are for the log and tests, not the client."""

    def __init__(self, message: str, detail: Any, *, host: str, port: int | None) -> None:
        super().__init__(message, detail)
        self.host, self.port = host, port


class HostPolicy:
    """Answers whether a URL an upstream named (token realm, redirect) is one it may send us to."""

    def __init__(self, config: UpstreamConfig, extra: list[str], what: str, setting: str, any_own_port: bool) -> None:
        base = URL(config.url)
        # A token service beside the registry (docker_auth on :5001) may be on any port of its host;
        # a redirect may not: on a loopback upstream that would be every service of this machine.
        self._any_own_port = any_own_port
        self._name = config.name
        self._what = what  # "token realm", "redirect": for messages
        self._setting = setting  # the setting that widens the policy, named in messages
        self._https = base.scheme == "https"
        self._host = normal_host(base.raw_host or "")
        self._port = base.port
        own = [self._host] if _is_ip(self._host) else [self._host, "*." + self._host]
        # (host pattern, the one port an entry names, else None: the usual ports)
        self._allowed: tuple[tuple[str, int | None], ...] = tuple(
            [(host, None) for host in own] + [_host_and_port(entry) for entry in extra]
        )

    def check(self, target: str) -> None:
        """Raise RefusedTarget unless `target` is http(s) on an allowed host and port (https if the upstream is)."""
        try:
            url = URL(target)
            host = normal_host(url.raw_host or "")
        except ValueError:
            url, host = URL(), ""
        schemes = ("https",) if self._https else ("http", "https")
        if not host or url.scheme not in schemes:
            raise self._refused(f"named an unusable {self._what}", url, host)
        if host == self._host and self._any_own_port:
            return
        usual = (DEFAULT_PORTS[url.scheme], self._port)
        ports = [port for pattern, port in self._allowed if _matches(host, pattern)]
        if not ports:
            raise self._refused(f"named a {self._what} on a host it may not use (see {self._setting})", url, host)
        if not any(url.port in ((port,) if port is not None else usual) for port in ports):
            why = f"named a {self._what} on a port it may not use (see {self._setting}: host:port)"
            raise self._refused(why, url, host)

    def _refused(self, why: str, url: URL, host: str) -> RefusedTarget:
        """The refusal, logged with the scheme, host, port and path (never the query: a signed URL's
        credentials); the client is told only the upstream's name and the setting, not the host."""
        port = f":{url.port}" if url.port is not None else ""
        place = f"{url.scheme}://{host}{port}{url.raw_path}"[:300] if host else "an unparseable URL"
        log.warning("upstream %s %s: %s", self._name, why, place)
        detail = {"upstream": self._name, "setting": self._setting}
        return RefusedTarget(f"upstream {self._name} {why}", detail, host=host[:255], port=url.port if host else None)


def realm_hosts(config: UpstreamConfig) -> list[str]:
    """Token realm hosts besides the upstream's own: `token_realms`, else the default for its host."""
    if config.token_realms is not None:
        return config.token_realms
    return default_realm_hosts(URL(config.url).raw_host or "")


class RealmPolicy(HostPolicy):
    """Where this upstream's token realm may be."""

    def __init__(self, config: UpstreamConfig) -> None:
        super().__init__(config, realm_hosts(config), "token realm", "token_realms", any_own_port=True)


def default_redirect_hosts(host: str) -> list[str]:
    """CDN hosts a well-known registry redirects blob downloads to."""
    host = normal_host(host)
    for pattern, cdns in WELL_KNOWN_REDIRECTS:
        if _matches(host, pattern):
            return list(cdns)
    return []


class RedirectPolicy(HostPolicy):
    """Where this upstream may redirect us: its own hosts and token realm hosts, the CDNs a
    well-known registry uses, and `redirect_hosts`."""

    def __init__(self, config: UpstreamConfig) -> None:
        host = URL(config.url).raw_host or ""
        extra = realm_hosts(config) + default_redirect_hosts(host) + config.redirect_hosts
        super().__init__(config, extra, "redirect", "redirect_hosts", any_own_port=False)
