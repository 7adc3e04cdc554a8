"""Raw HTTP/1.1 over a socket: sends paths and headers exactly as given (no client normalises
`..`, `%2e` or bad bytes away), which is what hostile input looks like on the wire."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def oci_code(self) -> str | None:
        """The OCI error code, or None when the body is not an OCI error document."""
        try:
            errors = json.loads(self.body)["errors"]
            first = errors[0]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        return first.get("code") if isinstance(first, dict) and {"code", "message", "detail"} <= set(first) else None


def raw_request(
    port: int,
    target: bytes,
    *,
    method: bytes = b"GET",
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    body: bytes = b"",
    timeout: float = 60,
) -> RawAnswer:
    """One request on its own connection (Connection: close); reads the whole answer."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Connection: close"]
    if not any(k.lower() == b"host" for k, _ in headers):
        lines.append(b"Host: 127.0.0.1")
    lines += [k + b": " + v for k, v in headers]
    if body:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    data = b"\r\n".join(lines) + b"\r\n\r\n" + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        parsed[k.strip().lower()] = v.strip()
    length = parsed.get("content-length")
    if method == b"HEAD":
        rest = b""
    elif length and length.isdigit():
        rest = rest[: int(length)]
    return RawAnswer(int(status_line.split()[1]), parsed, rest)
