"""Which HTTP(S) proxy a request to an upstream (registry, token realm, CDN) leaves through.

The upstream's `proxy` when configured; else the usual environment variables (`HTTPS_PROXY`,
`HTTP_PROXY`, `NO_PROXY`, lower case too), read once at start. Not aiohttp's `trust_env`: that
also reads `~/.netrc` and adds its credentials to requests, redirects to CDNs included.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from urllib.parse import urlsplit


def _with_scheme(proxy: str) -> str:
    """`proxy:3128` as curl takes it means `http://proxy:3128`."""
    return proxy if "://" in proxy else "http://" + proxy


class Egress:
    """The proxy for each URL: one configured for the upstream wins over the environment."""

    def __init__(self, proxy: str | None, environment: Mapping[str, str] | None = None) -> None:
        self._proxy = proxy
        # scheme -> proxy URL, and "no" -> the NO_PROXY list, as urllib reads them
        self._env = dict(urllib.request.getproxies_environment() if environment is None else environment)

    def proxy_for(self, url: str) -> str | None:
        if self._proxy:
            return self._proxy
        parts = urlsplit(url)
        proxy = self._env.get(parts.scheme)
        if not proxy or urllib.request.proxy_bypass_environment(parts.netloc, self._env):
            return None
        return _with_scheme(proxy)

    def hosts(self) -> frozenset[str]:
        """Host names of the proxies requests may leave through (the operator's: resolved unchecked)."""
        proxies = [self._proxy] if self._proxy else [v for k, v in self._env.items() if k != "no"]
        return frozenset(host for host in (urlsplit(_with_scheme(p)).hostname for p in proxies) if host)
