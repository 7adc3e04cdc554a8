"""`python -m cargohold.healthcheck`: exit 0 when this instance answers `GET /health`, else 1.

The container's HEALTHCHECK: slim images have no curl, and only the settings (file + CARGOHOLD_*
variables, as `serve` reads them) know where cargohold listens and whether that is HTTPS.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request

from cargohold.config import ConfigError, Settings, load_settings, split_host_port


def health_url(settings: Settings) -> str:
    """The plain-HTTP listener when there is one, else `listen`; wildcard addresses become loopback."""
    if settings.http_listen:
        address, scheme = settings.http_listen, "http"
    else:
        address, scheme = settings.listen, "https" if settings.tls.enabled else "http"
    host, port = split_host_port(address)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/health"


def main() -> int:
    try:
        url = health_url(load_settings(os.environ.get("CARGOHOLD_CONFIG")))
    except ConfigError as exc:
        print(f"unhealthy: config error: {exc}", file=sys.stderr)
        return 1
    # Liveness on loopback, not identity: the certificate may be the ACME placeholder.
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    # Straight to loopback: HTTP(S)_PROXY, set for upstream traffic (docs/upstreams.md), must not carry this.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=insecure))
    try:
        with opener.open(url, timeout=5) as resp:
            healthy = resp.status == 200
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
