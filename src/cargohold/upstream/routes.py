"""Which upstream and which upstream repository a client's repository name means."""

from __future__ import annotations

from dataclasses import dataclass

from cargohold.config import DOCKER_HUB
from cargohold.errors import NameUnknown
from cargohold.names import check_name
from cargohold.upstream.client import UpstreamClient


@dataclass(frozen=True, slots=True)
class Target:
    """A resolved request target: the upstream and the repository name it knows."""

    upstream: UpstreamClient
    repository: str


def _is_registry_host(component: str) -> bool:
    """Docker's rule: a first component with a dot or a port, or `localhost`, names a registry."""
    return "." in component or ":" in component or component == "localhost"


class Router:
    """Maps `/v2/<name>/...` (and containerd's `?ns=`) to an upstream; unknown registries are refused."""

    def __init__(self, upstreams: dict[str, UpstreamClient], default: str) -> None:
        self._upstreams = upstreams
        self._default = upstreams[default]

    def resolve(self, name: str, ns: str | None = None) -> Target:
        upstream = self._default
        first, _, rest = name.partition("/")
        if ns:
            upstream = self._named(ns)
        elif rest and _is_registry_host(first):
            upstream = self._named(first)
            name = rest
        check_name(name)
        if upstream.name == DOCKER_HUB and "/" not in name:
            name = "library/" + name
        return Target(upstream, name)

    def _named(self, host: str) -> UpstreamClient:
        upstream = self._upstreams.get(host.lower())
        if upstream is None:
            raise NameUnknown("no upstream registry is configured under this name", {"registry": host[:255]})
        return upstream
