"""The server's SSLContext, with a certificate that can change while it serves.

Every new handshake asks `CertReloader` (through the SNI callback, which OpenSSL calls for every
ClientHello, with or without a server name) for the newest context. A reload builds a complete new
context first, so a half-written or mismatched pair of files is refused and the old certificate
stays in use; connections already open keep theirs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import Path

log = logging.getLogger("cargohold.tls")

# Mozilla "intermediate": forward secrecy and AEAD ciphers only for TLS 1.2 (1.3 has only such suites).
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"

FileStamp = tuple[int, int, int]


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context holding cert (full chain, PEM) and key; raises when they do not load."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert, key)
    return ctx


def _stamp(path: Path) -> FileStamp:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class CertReloader:
    """Serves the newest good certificate from a pair of files; `context` goes to the TLS listener."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._pair = (cert, key)
        self._stamps = (_stamp(cert), _stamp(key))
        self._current = server_context(cert, key)
        # The listener's context only dispatches: each handshake switches to the current one.
        self.context = server_context(cert, key)
        self.context.sni_callback = self._pick

    @property
    def files(self) -> tuple[Path, Path]:
        return self._pair

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self._current

    def use(self, cert: Path, key: Path) -> None:
        """Serve another pair of files from the next handshake on; raises (keeping the old) when they do not load."""
        stamps = (_stamp(cert), _stamp(key))
        self._current = server_context(cert, key)
        self._pair, self._stamps = (cert, key), stamps
        log.info("TLS certificate loaded from %s", cert)

    def reload_if_changed(self) -> bool:
        """Load the files again when their mtime, size or inode changed; True when a new certificate is served."""
        cert, key = self._pair
        try:
            stamps = (_stamp(cert), _stamp(key))
        except OSError as exc:
            log.warning("TLS certificate files unreadable, keeping the old certificate: %s", exc)
            return False
        if stamps == self._stamps:
            return False
        try:
            self._current = server_context(cert, key)
        except (OSError, ssl.SSLError) as exc:
            # Most often a renewal caught between writing the key and the certificate: try again next time.
            log.warning("TLS certificate %s did not load, keeping the old one: %s", cert, exc)
            return False
        self._stamps = stamps
        log.info("TLS certificate reloaded from %s", cert)
        return True

    async def watch(self, interval: float) -> None:
        """Check the files every `interval` seconds, forever (run as a task, cancel to stop)."""
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file atomically (temp name, fsync, rename) with restrictive permissions from the start."""
    tmp = path.with_name(f".{path.name}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
