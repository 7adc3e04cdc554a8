"""Load generators: blob reads, image pulls, herds of pullers.

The runner starts this module as its own process (`python -m bench.load SPEC_JSON`, result as JSON
on stdout), so the clients never compete for a GIL with the rig's hub, which runs on a thread of
the runner. Bodies are read with `readinto` into one reused buffer per client: the client costs
about a kernel copy per byte, the same for every system measured. Over HTTPS (a `base` of
`https://...`) the same client reads through an ssl-wrapped socket that trusts the spec's `cafile`.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rig.images import ACCEPT_ALL, parse_challenge

BUFFER = 1 << 20
ATTEMPTS = 3


class LoadError(Exception):
    """A request the benchmark relies on did not succeed: the figures would be meaningless."""


@dataclass(frozen=True)
class Auth:
    """How a client authenticates: `none`, `basic` (sent with every request) or `bearer`
    (the token dance: follow the 401's Bearer realm, with Basic credentials when given)."""

    mode: str = "none"
    user: str | None = None
    password: str | None = None

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

    @classmethod
    def of(cls, spec: dict[str, Any] | None) -> Auth:
        return cls(**spec) if spec else cls()


@dataclass
class Tokens:
    """Bearer tokens per scope, shared by the clients of one load run (like a docker daemon's)."""

    by_scope: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def scope_of(path: str) -> str:
    """The pull scope for a registry path like /v2/<name>/blobs/<digest>."""
    name = path[len("/v2/") :].rsplit("/", 2)[0]
    return f"repository:{name}:pull"


def tls_context(cafile: str | None) -> ssl.SSLContext | None:
    """The client context trusting cafile (the bench's test CA), made once per load run: loading it
    per connection would count in the figures. None without a cafile (plain HTTP)."""
    return ssl.create_default_context(cafile=cafile) if cafile else None


def connect(url: str, tls: ssl.SSLContext | None, timeout: float) -> http.client.HTTPConnection:
    """An unopened connection to the origin of url: HTTPS (verified with tls) when its scheme says so."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if parts.scheme == "https":
        return http.client.HTTPSConnection(host, parts.port or 443, timeout=timeout, context=tls)
    return http.client.HTTPConnection(host, parts.port or 80, timeout=timeout)


class Client:
    """One keep-alive connection to one server, speaking the registry's auth dance."""

    def __init__(self, base_url: str, auth: Auth, tokens: Tokens, tls: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url
        self.tls = tls
        self.auth = auth
        self.tokens = tokens
        self.buffer = bytearray(BUFFER)
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def get(self, path: str, headers: dict[str, str] | None = None, *, keep: bool = False) -> tuple[int, bytes, int]:
        """GET with auth; returns (status, body if keep else b"", body length)."""
        scope = scope_of(path) if path.startswith("/v2/") and path != "/v2/" else ""
        for attempt in range(ATTEMPTS):
            sent = dict(headers or {})
            sent.update(self._authorization(scope))
            status, resp_headers, body, length = self._exchange(path, sent, keep or None)
            if status == 401 and attempt + 1 < ATTEMPTS and self._answer_challenge(resp_headers, scope):
                continue
            return status, body, length
        raise LoadError(f"GET {path}: still 401 after the auth dance")

    def _authorization(self, scope: str) -> dict[str, str]:
        if self.auth.mode == "basic":
            return {"Authorization": self.auth.basic()}
        token = self.tokens.by_scope.get(scope)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _answer_challenge(self, headers: http.client.HTTPMessage, scope: str) -> bool:
        """Fetch a token for a Bearer challenge; False when there is nothing to answer with."""
        challenge = headers.get("WWW-Authenticate", "")
        if not challenge.lower().startswith("bearer"):
            return False
        params = parse_challenge(challenge)
        query = urllib.parse.urlencode({"service": params.get("service", ""), "scope": scope})
        realm = urllib.parse.urlsplit(params["realm"])
        token_headers = {"Authorization": self.auth.basic()} if self.auth.user else {}
        conn = connect(params["realm"], self.tls, timeout=60)
        try:
            conn.request("GET", f"{realm.path}?{query}", headers=token_headers)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise LoadError(f"token service said {resp.status}: {body[:200]!r}")
        doc = json.loads(body)
        with self.tokens.lock:
            self.tokens.by_scope[scope] = str(doc.get("token") or doc["access_token"])
        return True

    def _exchange(
        self, path: str, headers: dict[str, str], keep: bool | None
    ) -> tuple[int, http.client.HTTPMessage, bytes, int]:
        for attempt in range(2):  # a kept-alive connection the server closed: one reconnect
            if self._conn is None:
                self._conn = connect(self.base_url, self.tls, timeout=120)
            try:
                self._conn.request("GET", path, headers=headers)
                resp = self._conn.getresponse()
                if keep or resp.status != 200:
                    body = resp.read()
                    return resp.status, resp.headers, body, len(body)
                return resp.status, resp.headers, b"", self._drain(resp)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _drain(self, resp: http.client.HTTPResponse) -> int:
        view = memoryview(self.buffer)
        total = 0
        while n := resp.readinto(view):
            total += n
        expected = resp.getheader("Content-Length")
        if expected is not None and int(expected) != total:
            raise LoadError(f"short body: {total} of {expected} bytes")
        return total


def _expect_ok(status: int, what: str, body: bytes = b"") -> None:
    if status != 200:
        raise LoadError(f"{what}: HTTP {status} {body[:300]!r}")


def _together(n: int, work: Callable[[int], int], *, tolerate: bool = False) -> tuple[int, float, int]:
    """Run work(i) on n threads started at once; returns (sum of results, wall seconds, failures).
    Failures raise LoadError unless `tolerate` (a herd counts them: some servers do fail)."""
    barrier = threading.Barrier(n + 1)
    results = [0] * n
    errors: list[BaseException] = []

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the runner below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors and not tolerate:
        raise LoadError(f"{len(errors)} of {n} clients failed: {errors[0]}") from errors[0]
    return sum(results), seconds, len(errors)


def read_blob(
    base: str, path: str, *, clients: int = 1, repeat: int = 1, auth: Auth = Auth(), cafile: str | None = None
) -> dict[str, float]:
    """`clients` connections at once, each reading `path` `repeat` times: bytes and wall time."""
    tokens = Tokens()
    tls = tls_context(cafile)

    def work(_: int) -> int:
        client = Client(base, auth, tokens, tls)
        try:
            client.get("/v2/")  # the auth dance happens here, outside the reads that count
            total = 0
            for _ in range(repeat):
                status, body, n = client.get(path)
                _expect_ok(status, f"GET {path}", body)
                total += n
            return total
        finally:
            client.close()

    total, seconds, _ = _together(clients, work)
    return {"bytes": total, "seconds": seconds}


def _pull(base: str, repo: str, ref: str, auth: Auth, tokens: Tokens, parallel: int, tls: ssl.SSLContext | None) -> int:
    """What `docker pull` does on the wire: the manifest, then config and layers `parallel` at a time."""
    client = Client(base, auth, tokens, tls)
    try:
        status, body, _ = client.get(f"/v2/{repo}/manifests/{ref}", {"Accept": ACCEPT_ALL}, keep=True)
        _expect_ok(status, f"manifest {repo}:{ref}", body)
    finally:
        client.close()
    manifest = json.loads(body)
    blobs = [manifest["config"], *manifest["layers"]]
    local = threading.local()
    opened: list[Client] = []

    def fetch(blob: dict[str, Any]) -> int:
        if not hasattr(local, "client"):
            local.client = Client(base, auth, tokens, tls)
            opened.append(local.client)
        client: Client = local.client
        status, body, n = client.get(f"/v2/{repo}/blobs/{blob['digest']}")
        _expect_ok(status, f"blob {blob['digest']}", body)
        if n != blob["size"]:
            raise LoadError(f"blob {blob['digest']}: {n} bytes, manifest says {blob['size']}")
        return n

    try:
        with ThreadPoolExecutor(parallel) as pool:
            return sum(pool.map(fetch, blobs))
    finally:
        for c in opened:
            c.close()


def pull(
    base: str,
    repo: str,
    ref: str,
    *,
    clients: int = 1,
    parallel: int = 3,
    auth: Auth = Auth(),
    tolerate: bool = False,
    cafile: str | None = None,
) -> dict[str, float]:
    """`clients` pullers of repo:ref at once (1 = a plain pull, 20 = a herd): bytes, wall time and
    how many pulls failed (only with `tolerate`; else a failure is an error)."""
    tokens = Tokens()
    tls = tls_context(cafile)
    total, seconds, failed = _together(
        clients, lambda _: _pull(base, repo, ref, auth, tokens, parallel, tls), tolerate=tolerate
    )
    return {"bytes": total, "seconds": seconds, "failed": failed}


def token(base: str, repo: str, auth: Auth, cafile: str | None = None) -> str:
    """A Bearer token for pulling repo from base, by the same dance the clients do."""
    tokens = Tokens()
    client = Client(base, Auth("bearer", auth.user, auth.password), tokens, tls_context(cafile))
    try:
        status, body, _ = client.get(f"/v2/{repo}/manifests/latest", {"Accept": ACCEPT_ALL}, keep=True)
        _expect_ok(status, "token dance", body)
    finally:
        client.close()
    return tokens.by_scope[scope_of(f"/v2/{repo}/manifests/latest")]


OPERATIONS: dict[str, Callable[..., dict[str, float]]] = {"read_blob": read_blob, "pull": pull}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    op = OPERATIONS[spec.pop("op")]
    spec["auth"] = Auth.of(spec.get("auth"))
    try:
        result = op(**spec)
    except LoadError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
