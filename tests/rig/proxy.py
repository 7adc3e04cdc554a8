"""A tiny forward HTTP proxy on loopback that records every request it passes on.

Plain-HTTP upstreams (the hub): absolute-form requests are forwarded with http.client and the
answer sent back whole (test images are small). https upstreams: `CONNECT host:port` opens a
tunnel (recorded once; what goes through it is TLS the proxy cannot read). Runs in threads, so sync tests and subprocesses
(cargohold with HTTP_PROXY) can use it alike.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_CHUNK = 256 * 1024


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _forward(self) -> None:
        target = urlsplit(self.path)
        if target.scheme != "http" or not target.hostname:
            self.send_error(400, "absolute http:// URL expected")
            return
        with self.server.lock:
            self.server.requests.append((self.command, self.path))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
        try:
            path = target.path + (f"?{target.query}" if target.query else "")
            conn.request(self.command, path, body=body, headers=headers)
            resp = conn.getresponse()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            data = b"" if self.command == "HEAD" else resp.read()
            self.send_header(
                "Content-Length", resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            )
            self.end_headers()
            self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_HEAD = do_POST = _forward

    def do_CONNECT(self) -> None:
        host, _, port = self.path.rpartition(":")
        with self.server.lock:
            self.server.requests.append(("CONNECT", self.path))
        upstream = socket.create_connection((host, int(port)), timeout=30)
        self.send_response(200, "Connection established")
        self.end_headers()
        back = threading.Thread(target=_pump, args=(upstream, self.connection), daemon=True)
        back.start()
        _pump(self.connection, upstream)
        back.join(timeout=30)
        upstream.close()
        self.close_connection = True


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy one direction of a tunnel until it closes, then half-close the other side."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[tuple[str, str]]
    lock: threading.Lock


class ForwardProxy:
    """`with ForwardProxy() as p:` p.url for HTTP_PROXY; p.requests lists (method, absolute URL)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._server = _Server((host, 0), _Forward)
        self._server.requests = []
        self._server.lock = threading.Lock()
        self._thread = threading.Thread(target=self._server.serve_forever, name="forward-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self._server.lock:
            return list(self._server.requests)

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
