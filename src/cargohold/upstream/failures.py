"""Why a request to an upstream failed, in words an operator can act on.

"ClientConnectorError" says nothing; "connection refused", "DNS lookup failed" or "certificate
verify failed" says where to look. Logs also get host:port (the registry, CDN, realm or proxy that
failed); what clients see names the upstream's configured name only, never an internal host.
Neither ever holds credentials: hosts and ports only, never a URL's user info.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl

import aiohttp
from yarl import URL

from cargohold.upstream.addresses import ForbiddenAddress

_ERRNO_CAUSES = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "connect timed out",
}


def cause(exc: BaseException) -> str:
    """A short, credential-free cause for a failed upstream request."""
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return f"proxy error: the proxy answered {exc.status}"
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return f"proxy error: {_os_cause(exc.os_error)}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "certificate verify failed"
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _os_cause(exc.os_error)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the response was cut short"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return _os_cause(exc)
    return type(exc).__name__


def _os_cause(error: OSError) -> str:
    if isinstance(error, ForbiddenAddress):
        return str(error)
    if isinstance(error, socket.gaierror):
        return "DNS lookup failed"
    if isinstance(error, ssl.SSLCertVerificationError):
        return "certificate verify failed"
    if isinstance(error, asyncio.TimeoutError):
        return "connect timed out"
    if error.errno in _ERRNO_CAUSES:
        return _ERRNO_CAUSES[error.errno]
    return error.strerror or type(error).__name__


def where(exc: BaseException, url: str) -> str:
    """host:port the failure happened at: the one aiohttp tried to connect to (a proxy too), else `url`'s."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{exc.host}:{exc.port}"
    parsed = URL(url)
    return f"{parsed.host}:{parsed.port}"
