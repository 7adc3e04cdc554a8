"""Which upstream and which upstream repository a client's request means.

In order: containerd's `?ns=<registry>`, then a Host header listed in an upstream's `hosts`,
then a registry host as the first path component (`/v2/ghcr.io/owner/image/...`), else the
default upstream (with `library/` added to one-component Docker Hub names). A registry that
is not configured, or a repository outside the upstream's `repositories` globs, is 404
NAME_UNKNOWN: this mirror is never an open proxy and nothing unlisted reaches an upstream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from cargohold.config import DOCKER_HUB
from cargohold.errors import NameUnknown
from cargohold.oci.names import check_name
from cargohold.upstream.client import UpstreamClient


@dataclass(frozen=True, slots=True)
class Target:
    """A resolved request target: the upstream, the repository name it knows, and the `ns` it was chosen by."""

    upstream: UpstreamClient
    repository: str
    namespace: str | None = None


def _is_registry_host(component: str) -> bool:
    """Docker's rule: a first component with a dot or a port, or `localhost`, names a registry."""
    return "." in component or ":" in component or component == "localhost"


def compile_globs(globs: Iterable[str]) -> re.Pattern[str]:
    """One pattern for repository globs: `*` and `?` stay within a path component, `**` crosses them."""
    parts = []
    for glob in globs:
        tokens = re.split(r"(\*\*|\*|\?)", glob)
        wild = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
        parts.append("".join(wild.get(t, re.escape(t)) for t in tokens))
    return re.compile("|".join(f"(?:{p})" for p in parts) if parts else r"(?!)")


def _without_port(host: str) -> str:
    return host.rsplit(":", 1)[0] if not host.endswith("]") else host


# Resolved targets a router remembers; past this many it starts again (names come from clients).
RESOLVED = 10_000


class Router:
    """Maps a request's name, `?ns=` and Host header to an upstream repository; refuses the rest."""

    def __init__(self, upstreams: dict[str, UpstreamClient], default: str) -> None:
        self._upstreams = upstreams
        self._default = upstreams[default]
        self._by_host = {host: u for u in upstreams.values() for host in u.config.hosts}
        self._allowed = {name: compile_globs(u.config.repositories) for name, u in upstreams.items()}
        # Keyed by the upstream a Host routes to, not the Host itself (any 8 KB string a client sends).
        self._resolved: dict[tuple[str, str | None, str | None], Target] = {}

    @property
    def upstreams(self) -> list[UpstreamClient]:
        return list(self._upstreams.values())

    def resolve(self, name: str, ns: str | None = None, host: str | None = None) -> Target:
        """The target of a request (every request resolves one: remembered, RESOLVED at most, refusals not)."""
        by_host = self._by_host_header(host)
        key = (name, ns, by_host.name if by_host is not None else None)
        target = self._resolved.get(key)
        if target is None:
            target = self._resolve(name, ns, by_host)
            if len(self._resolved) >= RESOLVED:
                self._resolved.clear()
            self._resolved[key] = target
        return target

    def _resolve(self, name: str, ns: str | None, by_host: UpstreamClient | None) -> Target:
        namespace = None
        if ns:
            upstream = self._named(ns)
            namespace = upstream.name
        elif by_host is not None:
            upstream = by_host
        else:
            upstream = self._default
            first, _, rest = name.partition("/")
            if rest and _is_registry_host(first):
                upstream = self._named(first)
                name = rest
        check_name(name)
        if upstream.name == DOCKER_HUB and "/" not in name:
            name = "library/" + name
        if not self._allowed[upstream.name].fullmatch(name):
            raise NameUnknown("repository is not served by this mirror", {"registry": upstream.name, "name": name})
        return Target(upstream, name, namespace)

    def _by_host_header(self, host: str | None) -> UpstreamClient | None:
        if not host or not self._by_host:
            return None
        host = host.lower()
        return self._by_host.get(host) or self._by_host.get(_without_port(host))

    def _named(self, host: str) -> UpstreamClient:
        upstream = self._upstreams.get(host.lower())
        if upstream is None:
            raise NameUnknown("no upstream registry is configured under this name", {"registry": host[:255]})
        return upstream
